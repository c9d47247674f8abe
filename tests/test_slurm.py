"""A real Slurm job: deploy/slurm/local-cluster.sh starts Slurm 22.05 (two virtual nodes, accounting) in a
loopback-only network namespace, `torchx run -s slurm components.py:distill -j 2x1` trains across both
nodes (torchrun, c10d rendezvous on node1), then `torchx status`, `torchx log` and `torchx list` are
checked and every daemon is stopped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.launch_support import REPO, VENV_BIN, assert_checkpoint, job_env, need_root_linux, run

KIT = REPO / "deploy/slurm/local-cluster.sh"
TRAIN_ARGS = ["--preset", "demo", "--epochs", "1", "--batch_size", "64", "--alpha", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster's environment for `local-cluster.sh exec`; stops every daemon afterwards."""
    need_root_linux("the single-machine Slurm cluster")
    env = job_env(
        # Its own state and namespace: a kit a user started by hand (defaults) is left alone.
        # The state (MariaDB data: the accounting schema) is kept between runs for a faster start.
        KDQ_SLURM_DIR="/var/tmp/kdq-slurm-test",
        KDQ_SLURM_NETNS="kdq-slurm-test",
        OMP_NUM_THREADS="1",
    )
    try:
        run([KIT, "start"], env=env, timeout=900)
        yield env
    finally:
        run([KIT, "stop"], env=env, timeout=120, check=False)
        assert not os.path.exists("/run/netns/kdq-slurm-test")
        for name in ("slurmctld", "slurmdbd", "slurmd-node1", "slurmd-node2"):
            assert not os.path.exists(f"/var/tmp/kdq-slurm-test/run/{name}.pid"), f"{name} still running"
        assert not os.path.exists("/var/tmp/kdq-slurm-test/mysqld/mariadb.pid"), "mariadbd still running"


def torchx(slurm_env, cwd, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run([KIT, "exec", VENV_BIN / "torchx", *args], cwd=cwd, env=slurm_env, timeout=timeout)


def test_distill_2x1_on_slurm(slurm, tmp_path):
    run_dir = tmp_path / "run"
    out = torchx(
        slurm, tmp_path, "run", "-s", "slurm", "-cfg", "time=15", "--wait",
        f"{REPO}/components.py:distill", "-j", "2x1", "--cpu", "1", "--memMB", "3000",
        *TRAIN_ARGS, "--run_dir", str(run_dir), timeout=900,
    ).stdout  # fmt: skip
    handle = re.search(r"slurm://torchx/\d+", out).group(0)
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    assert_checkpoint(run_dir)

    status = torchx(slurm, tmp_path, "status", handle).stdout
    assert "State: SUCCEEDED" in status, status
    assert "distill[0]:SUCCEEDED" in status and "distill[1]:SUCCEEDED" in status, status

    # One log per node (Slurm keeps stdout and stderr apart); kdq logs its epochs on stderr, from rank 0.
    logs = torchx(slurm, tmp_path, "log", "--streams", "stderr", f"{handle}/distill").stdout
    assert "distill/0" in logs and "distill/1" in logs, logs[-3000:]
    assert "epoch 1/1" in logs, logs[-3000:]

    listing = torchx(slurm, tmp_path, "list", "-s", "slurm").stdout
    assert handle.rsplit("/", 1)[1] in listing, listing


def test_pipeline_2x1_on_slurm_exports_once_from_rank_0(slurm, smoke_run, tmp_path):
    """The TorchX pipeline job on two Slurm nodes, resuming a copy of the smoke run without its evaluation and
    export: both ranks meet (c10d) and load the finished stages, rank 0 alone evaluates, exports and reports, and
    rank 1 returns: one certified export, one report."""
    import shutil

    from tests.targets import SMOKE_TARGET

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("export-*", "evaluation_results.json", "report*"))
    out = torchx(
        slurm, tmp_path, "run", "-s", "slurm", "-cfg", "time=15", "--wait",
        f"{REPO}/components.py:pipeline", "-j", "2x1", "--cpu", "1", "--memMB", "3000", "--preset", "smoke",
        "--run_dir", str(run_dir), "--device", "cpu", "--target", str(SMOKE_TARGET), "--", "--latency-runs", "3",
        timeout=900,
    ).stdout  # fmt: skip
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    handle = re.search(r"slurm://torchx/\d+", out).group(0)
    logs = torchx(slurm, tmp_path, "log", "--streams", "stderr", f"{handle}/pipeline").stdout
    assert logs.count("[pipeline] smoke done") == 1, logs[-3000:]  # rank 0 only: rank 1 returned after training
    assert json.loads((run_dir / "export-x86" / "parity.json").read_text())["verdict"] == "certified"
    assert (run_dir / "report.md").is_file()


def test_sweep_fans_candidates_out_as_parallel_slurm_jobs_then_gathers(slurm, smoke_sweep, tmp_path):
    """deploy/sweep.py through TorchX on Slurm, resuming a copy of the smoke sweep with a second candidate: the
    prepare job plans both (teacher and soft targets kept), two train jobs run at once (one a node), then the
    gather job adds the new candidate's certified export to the front."""
    import shutil

    from tests.targets import SMOKE_TARGET

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_sweep, run_dir)
    env = {**slurm, "PYTHONPATH": str(REPO)}
    out = run(
        [KIT, "exec", VENV_BIN / "python", REPO / "deploy" / "sweep.py", "-s", "slurm", "-cfg", "time=15",
         "--preset", "smoke", "--budget-ms", "5", "--candidate", "resnet8", "--candidate", "mobilenet_v2_x0.35",
         "--run-dir", str(run_dir), "--target", str(SMOKE_TARGET), "--device", "cpu", "--cpu", "1",
         "--memMB", "3000", "--latency-runs", "3"],
        cwd=tmp_path, env=env, timeout=1200,
    ).stdout  # fmt: skip
    handles = re.findall(r"\[sweep\] (prepare|train \(2 candidates in parallel\)|gather): (slurm://torchx/\d+)", out)
    assert [step for step, _ in handles] == ["prepare", *["train (2 candidates in parallel)"] * 2, "gather"], out
    listing = torchx(slurm, tmp_path, "list", "-s", "slurm").stdout
    assert all(h.rsplit("/", 1)[1] in listing for _, h in handles), listing
    result = json.loads((run_dir / "sweep.json").read_text())
    students = {p["name"]: p for p in result["points"] if p["kind"] == "student"}
    assert set(students) == {"resnet8", "mobilenet_v2_x0.35"}
    assert all(p["verdict"] == "certified" for p in students.values()), students
    assert (run_dir / "sweep" / "mobilenet_v2_x0.35" / "student_qat" / "checkpoint.pt").is_file()
    assert "mobilenet_v2_x0.35" in (run_dir / "report.md").read_text()
