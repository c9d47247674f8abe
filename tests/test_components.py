"""TorchX components (components.py): AppDef structure, TorchX's own validation, and real local_cwd runs.

The local_cwd runs train for real (demo preset, 1 epoch, no teacher: --alpha 0), through the `torchx` CLI
as a user types it, from the repo root with the repo's .torchxconfig.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from torchx import specs
from torchx.components import dist
from torchx.components.component_test_base import ComponentTestCase

from tests.launch_support import REPO, VENV_BIN, assert_checkpoint, in_netns, need_root_linux, netns, run

spec = importlib.util.spec_from_file_location("kdq_components", REPO / "components.py")
components = importlib.util.module_from_spec(spec)
spec.loader.exec_module(components)

NAMES = ("teacher", "distill", "export", "pipeline", "sweep")
TRAIN_ARGS = ["--preset", "demo", "--epochs", "1", "--batch_size", "64", "--alpha", "0", "--device", "cpu"]


class TestTorchXValidates(ComponentTestCase):
    """TorchX's own check: the docstrings parse into CLI help and the functions materialize an AppDef."""

    def test_validate(self) -> None:
        for name in NAMES:
            self.validate(components, name)


def test_help_shows_the_docstring():
    out = run([VENV_BIN / "torchx", "run", "components.py:distill", "--help"], cwd=REPO, timeout=60).stdout
    assert "Distil the student from the teacher" in out
    assert "--qat" in out and "quantization-aware training" in out
    # Python 3.13's argparse names the metavar once: "-j, --j str"; before, "-j str, --j str"
    assert re.search(r"-j( str)?, --j str +\{nnodes\}x\{nproc_per_node\}", out)
    for name in NAMES:
        out = run([VENV_BIN / "torchx", "run", f"components.py:{name}", "--help"], cwd=REPO, timeout=60).stdout
        assert "--image" in out and "--memMB" in out and "--env" in out and "--max_retries" in out


def test_one_process_runs_kdq_itself():
    app = components.distill(preset="demo", epochs=1, run_dir="/runs/demo", image="reg/kdq:1")
    (role,) = app.roles
    assert role.name == "distill" and role.image == "reg/kdq:1" and role.num_replicas == 1
    assert role.entrypoint == "kdq"
    assert role.args == ["distill", "--preset", "demo", "--run-dir", "/runs/demo", "--qat", "--epochs", "1"]


def test_a_recipe_file_replaces_the_preset():
    assert components.teacher(recipe="/cfg/my.toml").roles[0].args[:3] == ["teacher", "--recipe", "/cfg/my.toml"]
    assert components.distill(recipe="/cfg/my.toml").roles[0].args[:3] == ["distill", "--recipe", "/cfg/my.toml"]
    args = components.pipeline(recipe="/cfg/my.toml").roles[0].args
    assert args[:5] == ["pipeline", "--recipe", "/cfg/my.toml", "--run-dir", "runs/my"] and "--preset" not in args


def test_qat_is_forwarded_by_default_and_can_be_turned_off():
    assert "--qat" in components.distill().roles[0].args
    assert "--qat" not in components.distill(qat=False).roles[0].args


@pytest.mark.parametrize("j, nnodes, nproc", [("1x2", 1, 2), ("2x1", 2, 1), ("2x2", 2, 2), ("4", 1, 4)])
def test_several_processes_run_torchrun_like_dist_ddp(j, nnodes, nproc):
    env = {"OMP_NUM_THREADS": "1"}
    mounts = ["type=bind", "src=/a", "dst=/b"]
    app = components.distill("--online", j=j, cpu=4, memMB=2048, env=env, max_retries=2, mounts=mounts)
    ddp = dist.ddp(m="kdq.cli", j=j, cpu=4, memMB=2048, env=dict(env), max_retries=2, mounts=mounts)
    (role,), (ddp_role,) = app.roles, ddp.roles
    assert env == {"OMP_NUM_THREADS": "1"}, "the caller's env dict was modified"
    # Same wiring as TorchX's dist.ddp: replicas, resources, rendezvous port, env, retries, mounts.
    assert role.num_replicas == ddp_role.num_replicas == nnodes
    assert role.resource == ddp_role.resource and role.port_map == ddp_role.port_map == {"c10d": 29500}
    assert role.env == ddp_role.env and role.env["OMP_NUM_THREADS"] == "1"
    assert role.max_retries == 2 and role.mounts == ddp_role.mounts
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    command = role.args[1]
    assert command.startswith(ddp_role.args[1])
    assert f"--nnodes {nnodes} --nproc_per_node {nproc}" in command and "--rdzv_backend c10d" in command
    # Multi-node: the first node's host, from a variable each scheduler sets (macros.rank0_env).
    endpoint = "localhost:0" if nnodes == 1 else "$${${rank0_env}:=localhost}:29500"
    assert f"--rdzv_endpoint {endpoint}" in command
    assert command.endswith("-m kdq.cli distill --preset demo --qat --online")


def test_resources_named_resource_and_mounts():
    role = components.teacher(cpu=8, gpu=2, memMB=30000).roles[0]
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 2, 30000)
    named = "aws_t3.medium"  # one of TorchX's registered named resources
    assert components.teacher(h=named).roles[0].resource == specs.resource(h=named)
    # The CLI's `--mounts type=bind,src=/data,dst=/data,readonly,type=volume,src=runs,dst=/runs`:
    tokens = "type=bind,src=/data,dst=/data,readonly,type=volume,src=runs,dst=/runs".split(",")
    mounts = components.distill(mounts=tokens)
    bind, volume = mounts.roles[0].mounts
    assert (bind.src_path, bind.dst_path, bind.read_only) == ("/data", "/data", True)
    assert (volume.src, volume.dst_path) == ("runs", "/runs")


def test_bad_j_lists_valid_examples():
    with pytest.raises(ValueError, match="1:2x4 or 1x4 or 4"):
        components.distill(j="two")


def test_export_is_one_process():
    role = components.export("runs/demo/student_qat/checkpoint.pt", target="arm", out="/runs/export").roles[0]
    assert role.entrypoint == "kdq"
    assert role.args == ["export", "runs/demo/student_qat/checkpoint.pt", "--target", "arm", "--out", "/runs/export"]
    assert components.export("c.pt", verify=False, latency_runs=3).roles[0].args[-3:] == [
        "--latency-runs", "3", "--no-verify",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="one process"):
        components.export("ckpt.pt", j="1x2")


def test_a_sweep_step_is_one_kdq_sweep_process_and_only_train_takes_an_index():
    (role,) = components.sweep(step="train", index=3, preset="smoke", run_dir="/runs/s", candidates=["resnet8"]).roles
    assert role.entrypoint == "kdq" and role.num_replicas == 1
    assert role.args == ["sweep", "--step", "train", "--preset", "smoke", "--run-dir", "/runs/s", "--target", "x86",
                         "--index", "3", "--resume", "--candidate", "resnet8"]  # fmt: skip
    assert components.sweep(step="train", index=3).name == "kdq-sweep-train-3"
    assert "--budget-ms" in components.sweep(step="prepare", budget_ms=0.3).roles[0].args
    for bad in (dict(step="train"), dict(step="gather", index=0), dict(step="plan")):
        with pytest.raises(ValueError):
            components.sweep(**bad)


def test_pipeline_is_kdq_pipeline_itself():
    """One code path for the laptop, Slurm and Kubernetes: the job runs `kdq pipeline`, whose flow and backend
    come from the target (a PT2E target trains a PT2E QAT student), resuming by default; several processes run
    it under torchrun (rank 0 alone evaluates, exports and reports: kdq/pipeline.py)."""
    role = components.pipeline(run_dir="/runs/x", target="mobile", max_drop=0.5).roles[0]
    assert role.entrypoint == "kdq"
    assert role.args == ["pipeline", "--preset", "demo", "--run-dir", "/runs/x", "--target", "mobile", "--resume",
                         "--max-drop", "0.5"]  # fmt: skip
    assert "--resume" not in components.pipeline(resume=False).roles[0].args
    extra = components.pipeline("--dataset", "fashion-mnist", "--train-subset", "5000").roles[0].args
    assert extra[-4:] == ["--dataset", "fashion-mnist", "--train-subset", "5000"]
    multi = components.pipeline(j="2x1").roles[0]
    assert multi.entrypoint == "bash" and multi.args[1].startswith("torchrun ")
    assert multi.args[1].endswith("-m kdq.cli pipeline --preset demo --run-dir runs/demo --resume")


# ---------------------------------------------------------------------------------------------- real runs
def _torchx_run(cwd: Path, *args: str, timeout: float = 900) -> str:
    out = run([VENV_BIN / "torchx", "run", *args], cwd=cwd, timeout=timeout).stdout
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    return out


def test_the_pipeline_job_run_again_resumes_and_keeps_every_stage(smoke_run, tmp_path):
    """The session's smoke run is the TorchX pipeline job (tests/conftest.py); the same job again on its run
    directory (a re-run, or a retry with max_retries) keeps every trained stage, the evaluation and the certified
    export, and succeeds: it used to fail at `kdq evaluate`, which refused to overwrite its results."""
    import shutil

    from tests.conftest import torchx_pipeline
    from tests.targets import SMOKE_TARGET

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    out = torchx_pipeline(run_dir, tmp_path / "logs", "--target", str(SMOKE_TARGET), "--", "--latency-runs", "3")
    assert not re.search(r"\] epoch \d+/\d+", out), out[-3000:]  # no stage trained again ...
    assert all(f"[{stage}] resuming" in out for stage in ("teacher", "baseline", "student", "student_qat")), out[-3000:]
    assert "evaluation_results.json is newer than every checkpoint: kept" in out
    assert "already certifies this checkpoint" in out


class FakeContainer:
    """What TorchX's Docker scheduler reads of a container: its status and, once it ended, its exit code."""

    def __init__(self, status: str, exit_code: int = 0) -> None:
        self.status, self.exit_code = status, exit_code

    def wait(self, timeout: float) -> dict[str, int]:
        return {"StatusCode": self.exit_code}


@pytest.mark.parametrize(
    ("status", "exit_code", "state"),
    [("stopped", 0, specs.AppState.SUCCEEDED), ("stopped", 3, specs.AppState.FAILED),
     ("stopping", 0, specs.AppState.RUNNING), ("exited", 1, specs.AppState.FAILED),
     ("running", 0, specs.AppState.RUNNING)],
)  # fmt: skip
def test_local_docker_understands_podmans_container_states(status, exit_code, state):
    """Podman reports "stopping"/"stopped" before "exited"; TorchX alone raised KeyError('stopped') mid-wait."""
    from torchx.schedulers.docker_scheduler import DockerScheduler

    scheduler = DockerScheduler("test")
    assert scheduler._get_app_state(FakeContainer(status, exit_code)) == state
    components._accept_podman_container_states()  # a second import of components.py changes nothing
    assert scheduler._get_app_state(FakeContainer(status, exit_code)) == state


def test_local_cwd_distill_produces_a_checkpoint(tmp_path):
    """`torchx run -s local_cwd components.py:distill` on the demo preset, from the repo root."""
    run_dir = tmp_path / "run"
    _torchx_run(
        REPO, "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        "components.py:distill", *TRAIN_ARGS, "--run_dir", str(run_dir),
    )  # fmt: skip
    assert_checkpoint(run_dir)


def test_local_cwd_ddp_1x2(tmp_path):
    """-j 1x2: torchrun with two ranks (gloo on CPU); run in a loopback-only namespace (torchrun binds *)."""
    need_root_linux("the DDP test's loopback-only network namespace")
    run_dir = tmp_path / "run"
    with netns() as ns:
        argv = [VENV_BIN / "torchx", "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}"]
        argv += ["components.py:distill", "-j", "1x2", *TRAIN_ARGS, "--run_dir", str(run_dir)]
        out = run(in_netns(ns, argv), cwd=REPO, timeout=900).stdout
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    assert_checkpoint(run_dir)
    # torchrun --tee prefixes each rank's lines with [rank]: both ranks ran.
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*.log"))
    assert "[0]:" in logs and "[1]:" in logs, logs[-2000:]
