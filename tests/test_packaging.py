"""What an installed kdq carries: a wheel built from this checkout must hold the export targets."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_export_targets(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv is installed by `make setup`"
    subprocess.run([uv, "build", "--wheel", "--out-dir", tmp_path], cwd=REPO, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kdq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for target in (REPO / "export").glob("*.toml"):
        assert f"kdq/targets/{target.name}" in names
        assert zipfile.ZipFile(wheel).read(f"kdq/targets/{target.name}") == target.read_bytes()
    assert "kdq/cli.py" in names and not any(n.startswith(("tests/", "deploy/")) for n in names)
