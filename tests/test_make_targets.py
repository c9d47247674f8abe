"""The `make` targets README names run as written, on a tiny setting. The recipes run with this interpreter's
environment first on PATH and an empty RUN (uv's environment handling is `make setup`'s, taken as done here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from kdq import checkpoint as ck

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


def test_make_bench_accuracy_writes_its_tables(tmp_path):
    """`make bench-accuracy` end to end on the smoke recipe: every model of the seed's table, two seeds paired,
    the int8 models timed in interleaved rounds, the JSON written, README's tables made from it."""
    from bench.accuracy import tables

    tiny = ("--preset smoke --subset 600 --seeds 2 --kd-seeds 3 --teacher-epochs 1 --epochs 1 --rounds 2 "
            "--name accuracy-smoke "
            f"--out-dir {tmp_path / 'run'}")  # fmt: skip
    r = make("bench-accuracy", f"BENCH_ARGS={tiny}")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((ROOT / "bench" / "results" / "accuracy-smoke-latest.json").read_text())
    models = result["models"]
    for name, seeds in (("baseline", 3), ("kd_offline", 3), ("kd_online", 2), ("dist_offline", 3), ("dist_paper", 2)):
        assert len(models[name]["top1"]) == seeds, name
    for name in ("kd_offline_qat", "kd_offline_ptq", "baseline_ptq", "baseline_hires_ptq"):
        assert set(models[name]["ort_int8_ms"]) == {"b1", "b64"} and 0 < models[name]["ort_int8_top1"] <= 1
    assert models["baseline_hires"]["arch"] == "mobilenet_v2_hires"
    paper = ck.load_checkpoint(tmp_path / "run" / "seed1" / "dist_paper" / "checkpoint.pt")[ck.RECIPE]
    assert (paper["kd_loss"], paper["kd_weighting"], paper["alpha"]) == ("dist", "sum", 1.0)
    rendered = {t.title: t.rows for t in tables(result)}
    cells = [cell for rows in rendered.values() for row in rows for cell in row]
    assert any("(n=3): " in cell for cell in cells) and any("(n=2): " in cell for cell in cells)  # paired by seed
    assert "Paired by seed" in r.stdout
    assert f"for the whole benchmark on {os.cpu_count()} cores" in r.stdout  # the summary reads its environment


def test_make_bench_sweep_writes_its_table(smoke_sweep, tmp_path):
    """`make bench-sweep` on a copy of the smoke sweep (--resume keeps its teacher, student and exports): the plan
    and the front are measured again, and the results file holds README's table."""
    import shutil

    from bench.sweep import tables
    from tests.targets import SMOKE_TARGET

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_sweep, run_dir)
    tiny = (f"--preset smoke --budget-ms 0.3 --candidate resnet8 --run-dir {run_dir} --target {SMOKE_TARGET} "
            "--rounds 1 --runs 3 --resume")  # fmt: skip
    latest = ROOT / "bench" / "results" / "sweep-latest.json"
    before = latest.stat().st_mtime_ns if latest.exists() else 0
    r = make("bench-sweep", f"BENCH_ARGS={tiny}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest.stat().st_mtime_ns > before
    result = json.loads(latest.read_text())
    assert result["environment"]["git"]["commit"] and result["recipe"] == "smoke" and result["rounds"] == 1
    assert {p["name"] for p in result["points"]} == {"resnet8", "teacher (int8)", "teacher (fp32)"}
    assert "| resnet8 | certified |" in r.stdout and f"Decision: {result['decision']}." in r.stdout
    assert [type(p).__name__ for p in tables(result)][:2] == ["Table", "str"]
