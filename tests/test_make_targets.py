"""The `make` targets README names run as written, on a tiny setting. The recipes run with this interpreter's
environment first on PATH and an empty RUN (uv's environment handling is `make setup`'s, taken as done here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["make", "-o", "setup", *args, "RUN="], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_make_bench_writes_its_results(tmp_path):
    """`make bench` once crashed after its training part (it sized a .pt2 file an eager export never writes)."""
    tiny = ("--models student --epochs 2 --train-rounds 1 --student-steps 2 --pipeline-images 64 --rounds 1 "
            "--runs 3 --warmup 1 --threads 1 --batches 1")  # fmt: skip
    latest = ROOT / "bench" / "results" / "bench-latest.json"
    before = latest.stat().st_mtime_ns if latest.exists() else 0
    r = make("bench", f"BENCH_ARGS={tiny}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest.stat().st_mtime_ns > before
    results = json.loads(latest.read_text())
    assert {"training", "inference", "floor"} <= set(results)
    assert set(results["inference"]["sizes_bytes"]["int8"]) == {"state_dict", "torchscript", "onnx"}
