"""Reading kdq's TOML files (recipes, export targets) on every supported Python; no torch import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kdq
from kdq.errors import KdqError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def shipped_folder(repo_folder: str, packaged_name: str) -> Path:
    """A folder of TOML files at the repo's top level (`export/`, `recipes/`); an installed wheel carries a copy
    inside the package as `kdq/<packaged_name>/` (pyproject.toml's force-include)."""
    packaged = Path(kdq.__file__).parent / packaged_name
    return packaged if packaged.is_dir() else Path(kdq.__file__).resolve().parents[1] / repo_folder


def read_toml(path: Path, error: type[KdqError]) -> dict[str, Any]:
    """A TOML file's table; a file that is not TOML is a one-line `error` naming it."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from e
