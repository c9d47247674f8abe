"""A Slurm job that is requeued mid-epoch (`scontrol requeue`: preemption, a node drained) restarts and resumes
from its last checkpoint, and ends bit-identical to a run that was never interrupted.

Runs on the single-machine Slurm of deploy/slurm/local-cluster.sh (root, Linux), with its own state folder and
network namespace so that tests/test_slurm.py or a cluster started by hand are left alone.
"""

from __future__ import annotations

import json
import shlex
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq.cli import main
from tests.launch_support import REPO, VENV_BIN, job_env, need_root_linux, run

from .conftest import same_weights

KIT = REPO / "deploy/slurm/local-cluster.sh"
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED", ""}
ARGS = ["baseline", "--preset", "smoke", "--width", "0.35", "--device", "cpu", "--seed", "3", "--epochs", "3"]


@pytest.fixture(scope="module")
def cluster():
    need_root_linux("the single-machine Slurm cluster")
    env = job_env(KDQ_SLURM_DIR="/var/tmp/kdq-slurm-requeue", KDQ_SLURM_NETNS="kdq-slurm-requeue", OMP_NUM_THREADS="1")
    try:
        run([KIT, "start"], env=env, timeout=900)
        yield env
    finally:
        run([KIT, "stop"], env=env, timeout=120, check=False)


def slurm(env, *argv: str, check: bool = True) -> str:
    return run([KIT, "exec", *argv], env=env, timeout=60, check=check).stdout.strip()


def test_a_requeued_job_resumes_from_its_last_checkpoint(cluster, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    ckpt, history = run_dir / "baseline" / "checkpoint.pt", run_dir / "baseline" / "history.json"
    script = tmp_path / "train.sh"
    # --resume from the first start on: a fresh job has no checkpoint yet and simply starts.
    script.write_text(
        "#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=3000\n"
        f"#SBATCH --output={log}\n"
        'echo "[job] start, restart ${SLURM_RESTART_COUNT:-0}" >&2\n'
        f"exec {VENV_BIN / 'kdq'} {shlex.join(ARGS)} --run-dir {run_dir} --resume\n"
    )
    job = slurm(cluster, "sbatch", "--parsable", str(script)).split(";")[0]
    requeued: dict = {}

    def requeue_mid_epoch_2():
        deadline = time.monotonic() + 600
        while not history.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.4 * json.loads(history.read_text())[0]["epoch_seconds"])
        requeued["epoch"] = ck.load_checkpoint(ckpt)[ck.EPOCH]
        slurm(cluster, "scontrol", "requeue", job)
        # Slurm holds a requeued job for 2 minutes (BeginTime); let it start again sooner, but not within
        # the requeue's second: slurmd rejects a credential as old as its revocation ("Job credential
        # revoked") and the job then FAILS instead of restarting.
        for _ in range(50):
            if "PENDING" in slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T", check=False):
                break
            time.sleep(0.2)
        slurm(cluster, "scontrol", "update", f"jobid={job}", "StartTime=now+3")

    requeuer = threading.Thread(target=requeue_mid_epoch_2)
    requeuer.start()
    # Meanwhile the same command, never interrupted, in this process (one thread, like the job).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = CliRunner().invoke(main, [*ARGS, "--run-dir", str(tmp_path / "straight")])
    finally:
        torch.set_num_threads(threads)
    assert straight.exit_code == 0, straight.output
    requeuer.join(timeout=700)
    deadline = time.monotonic() + 600
    while slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T", check=False):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)

    text = log.read_text()
    # Accounting (slurmdbd) can lag the controller by a moment: wait for the final state there too.
    deadline = time.monotonic() + 60
    while (state := slurm(cluster, "sacct", "-n", "-X", "-P", "-j", job, "-o", "State")) in LIVE_STATES:
        assert time.monotonic() < deadline, f"sacct still says {state}"
        time.sleep(1)
    assert state == "COMPLETED", text[-3000:]
    assert "[job] start, restart 0" in text and "[job] start, restart 1" in text
    assert "CANCELLED AT" in text and "DUE TO JOB REQUEUE" in text, text[-3000:]
    assert 1 <= requeued["epoch"] < 3
    assert f"resuming {ckpt} after epoch {requeued['epoch']}" in text, text[-3000:]
    a, b = ck.load_checkpoint(ckpt), ck.load_checkpoint(tmp_path / "straight" / "baseline" / "checkpoint.pt")
    assert a[ck.EPOCH] == 3 and a[ck.DONE]
    assert same_weights(a[ck.MODEL], b[ck.MODEL])  # bit-identical to the uninterrupted run
    assert [h["train_loss"] for h in a[ck.HISTORY]] == [h["train_loss"] for h in b[ck.HISTORY]]
