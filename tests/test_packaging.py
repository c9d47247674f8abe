"""What an installed kdq carries: a wheel built from this checkout must hold the export targets and recipes."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_export_targets_and_recipes(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv is installed by `make setup`"
    subprocess.run([uv, "build", "--wheel", "--out-dir", tmp_path], cwd=REPO, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kdq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, packaged in (("export", "kdq/targets"), ("recipes", "kdq/recipes_toml")):
        files = list((REPO / folder).glob("*.toml"))
        assert files
        for file in files:
            assert f"{packaged}/{file.name}" in names
            assert zipfile.ZipFile(wheel).read(f"{packaged}/{file.name}") == file.read_bytes()
    assert "kdq/cli.py" in names and not any(n.startswith(("tests/", "deploy/")) for n in names)
