"""Reading kdq's TOML files (recipes, export targets) on every supported Python; no torch import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdq.errors import KdqError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def read_toml(path: Path, error: type[KdqError]) -> dict[str, Any]:
    """A TOML file's table; a file that is not TOML is a one-line `error` naming it."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from e
