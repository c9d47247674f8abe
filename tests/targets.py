"""Test export targets derived from the real ones (export/*.toml) rather than rewritten from strings."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from kdq.artifacts import RATIO_GATES, ExportError, load_target
from kdq.tomlfile import read_toml

SMOKE_TARGET = Path(__file__).parent / "smoke-target.toml"


def smoke_target(base: str, folder: Path, paths: list[str] | None = None, real_gates: bool = False, **gates) -> Path:
    """export/BASE.toml for a model trained for seconds, written to FOLDER/BASE-smoke.toml: it `extends` BASE
    (contract, int8 paths, ONNX Runtime config), takes tests/smoke-target.toml's tolerance for every gate the two
    share (BASE's own with `real_gates`) and its [latency], and drops the timing gates (a test shares the CPU);
    `gates` override (None drops one), as `paths` does."""
    smoke = read_toml(SMOKE_TARGET, ExportError)
    loose = {} if real_gates else smoke["gates"]
    merged = {k: loose.get(k, v) for k, v in load_target(base).gates.items() if k not in RATIO_GATES}
    merged = {k: v for k, v in (merged | gates).items() if v is not None}
    path = folder / f"{base}-smoke.toml"
    data = {"extends": base} | ({"paths": paths} if paths is not None else {})
    path.write_text(tomli_w.dumps(data | {"gates": merged, "latency": smoke["latency"]}))
    return path
