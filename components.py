"""TorchX components for kdq: launch the same jobs on a laptop, a Slurm cluster or Kubernetes.

Each component is a plain function returning a TorchX ``AppDef`` that runs the ``kdq`` command line;
kdq itself knows nothing of TorchX. One process (``-j 1x1``) runs ``kdq ...`` directly; more run it under
``torchrun`` with c10d rendezvous, wired by TorchX's own ``dist.ddp``. Options after ``--`` go to kdq verbatim.

The same job on each scheduler (from the repo root, which ships a ``.torchxconfig``)::

    torchx run components.py:distill --help
    torchx run -s local_cwd components.py:distill --preset demo --epochs 1 -j 1x2
    torchx run -s slurm components.py:distill --preset demo --epochs 1 -j 2x1 --run_dir $PWD/runs/demo
    torchx run -s kubernetes --workspace "" components.py:distill --image REGISTRY/kdq:TAG -j 2x1 \\
        --mounts type=volume,src=kdq-runs,dst=/runs --run_dir /runs/demo
    torchx run -s local_docker --workspace "" components.py:distill --image localhost/kdq:latest \\
        --mounts type=bind,src=$PWD/runs,dst=/runs --run_dir /runs/demo
"""

# TorchX reads these annotations at run time and understands typing's Optional/Dict/List, not `X | None`.
# ruff: noqa: UP006, UP035, UP045

import dataclasses
import shlex
from pathlib import Path
from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist


def _accept_podman_container_states() -> None:
    """Let `-s local_docker` poll podman's Docker-compatible API (deploy/container/docker-socket.sh).

    Podman passes a finished container through "stopping" and "stopped" (exited, not yet cleaned up) before
    Docker's "exited"; TorchX knows only Docker's states and raised KeyError('stopped') while waiting. A
    stopped container's process has ended, so it is judged by its exit code exactly as an exited one.
    """
    try:
        from torchx.schedulers import docker_scheduler
    except ImportError:  # a TorchX without the Docker scheduler
        return
    if getattr(docker_scheduler.DockerScheduler._get_app_state, "accepts_podman", False):
        return
    docker_scheduler.CONTAINER_STATE.setdefault("stopping", specs.AppState.RUNNING)
    docker_state = docker_scheduler.DockerScheduler._get_app_state

    def app_state(self: docker_scheduler.DockerScheduler, container: "docker_scheduler.Container") -> specs.AppState:
        if container.status != "stopped":
            return docker_state(self, container)
        return specs.AppState.SUCCEEDED if container.wait(timeout=10)["StatusCode"] == 0 else specs.AppState.FAILED

    app_state.accepts_podman = True  # type: ignore[attr-defined]
    docker_scheduler.DockerScheduler._get_app_state = app_state  # type: ignore[method-assign]


_accept_podman_container_states()

DEFAULT_IMAGE = "localhost/kdq:latest"  # what `make image` builds; push it to your registry for clusters


def _flags(**options: object) -> List[str]:
    """kdq CLI options from keyword arguments: None is left out, True becomes a bare flag, False nothing."""
    argv: List[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _recipe_flags(preset: str, recipe: Optional[str]) -> List[str]:
    """A recipe file replaces the preset (kdq refuses both)."""
    return _flags(recipe=recipe) if recipe else _flags(preset=preset)


def _escape(arg: str) -> str:
    """Shell-quote one argument and protect `$` from TorchX's macro substitution."""
    return shlex.quote(arg).replace("$", "$$")


def _nprocs(j: str) -> int:
    _, max_nnodes, nproc_per_node, _ = dist.parse_nnodes(j)  # raises with valid examples on a bad -j
    return max_nnodes * nproc_per_node


def _ddp_role(name: str, image: str, j: str, cpu: int, gpu: int, memMB: int, h: Optional[str],
              env: Optional[Dict[str, str]], max_retries: int, mounts: Optional[List[str]], rdzv_port: int,
              job_name: Optional[str]) -> specs.Role:  # fmt: skip
    """The role `dist.ddp` builds for `torchrun -m kdq.cli`, renamed after the component (args replaced later)."""
    app = dist.ddp(
        m="kdq.cli",
        image=image,
        name=job_name or f"kdq-{name}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=dict(env or {}),  # dist.ddp writes into the dict it gets: never hand it the caller's
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    return dataclasses.replace(app.roles[0], name=name)


def _torchrun_command(role: specs.Role, kdq_argv: List[str]) -> str:
    """The shell command `dist.ddp` wrote for its role, with our kdq arguments in place of its script args."""
    command = role.args[1]  # ["-c", "torchrun ... -m kdq.cli"]
    return command + "".join(" " + _escape(a) for a in kdq_argv)


def _app(name: str, argv: List[str], image: str, j: str, cpu: int, gpu: int, memMB: int, h: Optional[str],
         env: Optional[Dict[str, str]], max_retries: int, mounts: Optional[List[str]], rdzv_port: int,
         job_name: Optional[str]) -> specs.AppDef:  # fmt: skip
    """One role running `kdq ARGV`: directly in one process, `torchrun -m kdq.cli ARGV` in several."""
    role = _ddp_role(name, image, j, cpu, gpu, memMB, h, env, max_retries, mounts, rdzv_port, job_name)
    app_name = job_name or f"kdq-{name}"
    if _nprocs(j) == 1:  # one plain process: no shell, no torchrun; the scheduler runs kdq
        return specs.AppDef(app_name, roles=[dataclasses.replace(role, entrypoint="kdq", args=list(argv))])
    return specs.AppDef(app_name, roles=[dataclasses.replace(role, args=["-c", _torchrun_command(role, argv)])])


def teacher(
    *kdq_args: str,
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
    name: Optional[str] = None,
    preset: str = "demo",
    recipe: Optional[str] = None,
    run_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    arch: Optional[str] = None,
    device: Optional[str] = None,
    resume: bool = False,
    overwrite: bool = False,
) -> specs.AppDef:
    """
    Train the teacher: `kdq teacher` -> RUN_DIR/teacher/checkpoint.pt.

    Args:
        kdq_args: extra `kdq teacher` options, passed through verbatim (after --)
        image: container image (local_docker, kubernetes); local_cwd and slurm run in the current directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x1, 1x2, 2x1; more than one process runs torchrun (c10d rendezvous)
        cpu: CPUs per node
        gpu: GPUs per node (nproc_per_node must not exceed it on GPU hosts)
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables for the job, e.g. KDQ_DATA_DIR=/data,OMP_NUM_THREADS=1
        max_retries: how many times the scheduler may restart the job
        mounts: mounts for containers, e.g. type=bind,src=/host/runs,dst=/runs or type=volume,src=PVC,dst=/runs
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: job name (None: kdq-teacher)
        preset: kdq's built-in recipe (demo, fashion-mnist, fashion-mnist-cpu, cifar10, cifar100, smoke)
        recipe: a recipe file as the job sees it, instead of the preset (`kdq recipe show` starts one)
        run_dir: run directory as the job sees it (shared storage for multi-node) (None: runs/PRESET)
        data_dir: dataset root as the job sees it (None: data, or $KDQ_DATA_DIR)
        epochs: epochs (None: the preset's)
        batch_size: global batch size (None: the preset's)
        lr: peak learning rate (None: the preset's)
        arch: teacher architecture (None: the preset's)
        device: auto, cpu, cuda (None: auto)
        resume: continue from RUN_DIR/teacher/checkpoint.pt if there is one (use with max_retries)
        overwrite: replace an existing checkpoint
    """
    argv = ["teacher", *_recipe_flags(preset, recipe), *_flags(run_dir=run_dir, data_dir=data_dir, epochs=epochs)]
    argv += _flags(batch_size=batch_size, lr=lr, arch=arch, device=device, resume=resume, overwrite=overwrite)
    return _app("teacher", [*argv, *kdq_args], image, j, cpu, gpu, memMB, h, env, max_retries, mounts, rdzv_port, name)


def distill(
    *kdq_args: str,
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
    name: Optional[str] = None,
    preset: str = "demo",
    recipe: Optional[str] = None,
    run_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    teacher: Optional[str] = None,
    qat: bool = True,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    alpha: Optional[float] = None,
    temperature: Optional[float] = None,
    device: Optional[str] = None,
    resume: bool = False,
    overwrite: bool = False,
) -> specs.AppDef:
    """
    Distil the student from the teacher: `kdq distill`, with quantization-aware training by default.
    Writes RUN_DIR/student_qat/ (RUN_DIR/student/ with --qat False); computes the soft targets if missing.

    Args:
        kdq_args: extra `kdq distill` options, passed through verbatim (after --)
        image: container image (local_docker, kubernetes); local_cwd and slurm run in the current directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x1, 1x2, 2x1; more than one process runs torchrun (c10d rendezvous)
        cpu: CPUs per node
        gpu: GPUs per node (nproc_per_node must not exceed it on GPU hosts)
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables for the job, e.g. KDQ_DATA_DIR=/data,OMP_NUM_THREADS=1
        max_retries: how many times the scheduler may restart the job
        mounts: mounts for containers, e.g. type=bind,src=/host/runs,dst=/runs or type=volume,src=PVC,dst=/runs
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: job name (None: kdq-distill)
        preset: kdq's built-in recipe (demo, fashion-mnist, fashion-mnist-cpu, cifar10, cifar100, smoke)
        recipe: a recipe file as the job sees it, instead of the preset (`kdq recipe show` starts one)
        run_dir: run directory as the job sees it (shared storage for multi-node) (None: runs/PRESET)
        data_dir: dataset root as the job sees it (None: data, or $KDQ_DATA_DIR)
        teacher: teacher checkpoint (None: RUN_DIR/teacher/checkpoint.pt)
        qat: quantization-aware training + KD (kdq distill --qat); False trains a float student
        epochs: epochs (None: the preset's)
        batch_size: global batch size (None: the preset's)
        lr: peak learning rate (None: the preset's)
        alpha: weight of the teacher's soft targets in [0, 1]; 0 needs no teacher (None: the preset's)
        temperature: KD temperature (None: the preset's)
        device: auto, cpu, cuda (None: auto)
        resume: continue from the stage's checkpoint if there is one (use with max_retries)
        overwrite: replace an existing checkpoint
    """
    argv = ["distill", *_recipe_flags(preset, recipe), *_flags(run_dir=run_dir, data_dir=data_dir, teacher=teacher)]
    argv += _flags(qat=qat)
    argv += _flags(epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha, temperature=temperature)
    argv += _flags(device=device, resume=resume, overwrite=overwrite)
    return _app("distill", [*argv, *kdq_args], image, j, cpu, gpu, memMB, h, env, max_retries, mounts, rdzv_port, name)


def export(
    checkpoint: str,
    *kdq_args: str,
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    name: Optional[str] = None,
    target: str = "x86",
    out: Optional[str] = None,
    data_dir: Optional[str] = None,
    verify: bool = True,
    latency_runs: Optional[int] = None,
    overwrite: bool = False,
) -> specs.AppDef:
    """
    Export an int8 checkpoint to TorchScript + ONNX and certify parity: `kdq export`. Runs in one process.

    Args:
        checkpoint: checkpoint as the job sees it, e.g. runs/demo/student_qat/checkpoint.pt
        kdq_args: extra `kdq export` options, passed through verbatim (after --)
        image: container image (local_docker, kubernetes); local_cwd and slurm run in the current directory
        j: must be 1x1 (or 1): export is a single process; accepted so every component takes the same options
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables for the job, e.g. OMP_NUM_THREADS=2
        max_retries: how many times the scheduler may restart the job
        mounts: mounts for containers, e.g. type=bind,src=/host/runs,dst=/runs or type=volume,src=PVC,dst=/runs
        name: job name (None: kdq-export)
        target: export target (export/TARGET.toml), e.g. x86, arm
        out: output directory (None: RUN/export-TARGET beside the checkpoint's stage folder)
        data_dir: dataset root for the parity run (None: data, or $KDQ_DATA_DIR)
        verify: certify parity and latency against the target's gates
        latency_runs: timed runs per latency cell (None: the target's)
        overwrite: replace an existing export folder
    """
    if _nprocs(j) != 1:
        raise ValueError(f"export runs in one process: use -j 1x1, not -j {j}")
    argv = ["export", checkpoint, *_flags(target=target, out=out, data_dir=data_dir)]
    argv += [*_flags(latency_runs=latency_runs, overwrite=overwrite), *([] if verify else ["--no-verify"]), *kdq_args]
    return _app("export", argv, image, j, cpu, gpu, memMB, h, env, max_retries, mounts, 29500, name)


def pipeline(
    *kdq_args: str,
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
    name: Optional[str] = None,
    preset: str = "demo",
    recipe: Optional[str] = None,
    run_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    target: Optional[str] = None,
    device: Optional[str] = None,
    resume: bool = True,
    require_teacher_ahead: bool = False,
    max_drop: Optional[float] = None,
) -> specs.AppDef:
    """
    One job, `kdq pipeline` itself: teacher -> baseline -> KD student -> QAT-KD student (for the target's flow and
    backend) -> evaluation -> certified export -> report, the same code on a laptop, Slurm and Kubernetes. On
    several processes it runs under torchrun: every process trains, rank 0 alone evaluates, exports and reports.
    With resume (default) a retried or re-run job skips finished work. Epochs, batch sizes and learning rates are
    the recipe's: `kdq recipe show --preset demo > my.toml` starts a file to pass as `recipe`.

    Args:
        kdq_args: more `kdq pipeline` options, verbatim (after --), e.g. --dataset fashion-mnist --train-subset 5000
        image: container image (local_docker, kubernetes); local_cwd and slurm run in the current directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x1, 1x2, 2x1; more than one process runs torchrun (c10d rendezvous)
        cpu: CPUs per node
        gpu: GPUs per node (nproc_per_node must not exceed it on GPU hosts)
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables for the job, e.g. KDQ_DATA_DIR=/data,OMP_NUM_THREADS=1
        max_retries: how many times the scheduler may restart the job
        mounts: mounts for containers, e.g. type=bind,src=/host/runs,dst=/runs or type=volume,src=PVC,dst=/runs
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        name: job name (None: kdq-pipeline)
        preset: kdq's built-in recipe (demo, fashion-mnist, fashion-mnist-cpu, cifar10, cifar100, smoke)
        recipe: a recipe file as the job sees it, instead of the preset
        run_dir: run directory as the job sees it (shared storage for multi-node) (None: runs/PRESET or runs/RECIPE)
        data_dir: dataset root as the job sees it (None: data, or $KDQ_DATA_DIR)
        target: export target (export/TARGET.toml: x86, arm, x86-pt2e, mobile, or a .toml path); QAT trains for
            its flow and backend (None: the recipe's, x86)
        device: auto, cpu, cuda (None: auto)
        resume: skip or continue finished stages (a retried job picks up where it stopped)
        require_teacher_ahead: stop before the KD student unless the teacher beat the baseline on validation
        max_drop: accuracy points int8 may lose against float on validation images; beyond, repair (eager flow)
    """
    root = run_dir or f"runs/{Path(recipe).stem if recipe else preset}"
    argv = ["pipeline", *_recipe_flags(preset, recipe), *_flags(run_dir=root, data_dir=data_dir, target=target,
            device=device, resume=resume, require_teacher_ahead=require_teacher_ahead, max_drop=max_drop)]  # fmt: skip
    return _app("pipeline", [*argv, *kdq_args], image, j, cpu, gpu, memMB, h, env, max_retries, mounts,
                rdzv_port, name)  # fmt: skip


def sweep(
    *kdq_args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    name: Optional[str] = None,
    step: str = "all",
    index: Optional[int] = None,
    budget_ms: Optional[float] = None,
    preset: str = "demo",
    recipe: Optional[str] = None,
    run_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    target: str = "x86",
    candidates: Optional[List[str]] = None,
    device: Optional[str] = None,
    resume: bool = True,
    latency_runs: Optional[int] = None,
) -> specs.AppDef:
    """
    One step of `kdq sweep` (students for a latency budget), in one process. `step=all` runs the whole sweep as one
    job; a cluster runs prepare, then one `train` job per candidate in parallel, then gather: deploy/sweep.py does
    that through TorchX's runner.

    Args:
        kdq_args: more `kdq sweep` options, verbatim (after --)
        image: container image (local_docker, kubernetes); local_cwd and slurm run in the current directory
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables for the job, e.g. KDQ_DATA_DIR=/data,OMP_NUM_THREADS=2
        max_retries: how many times the scheduler may restart the job
        mounts: mounts for containers, e.g. type=bind,src=/host/runs,dst=/runs or type=volume,src=PVC,dst=/runs
        name: job name (None: kdq-sweep-STEP, kdq-sweep-train-INDEX)
        step: all, prepare (plan + teacher + soft targets), train (one candidate: index) or gather (front, choice)
        index: step=train: the index of the candidate, among those within budget in RUN_DIR/sweep/plan.json
        budget_ms: int8 ms per batch on the CPU that plans (steps all and prepare)
        preset: kdq's built-in recipe (demo, fashion-mnist, fashion-mnist-cpu, cifar10, cifar100, smoke)
        recipe: a recipe file as the job sees it, instead of the preset
        run_dir: run directory as the job sees it, shared by every step (None: runs/PRESET or runs/RECIPE)
        data_dir: dataset root as the job sees it (None: data, or $KDQ_DATA_DIR)
        target: export target (export/TARGET.toml or a .toml path)
        candidates: plan only these candidates (None: kdq plan's whole family)
        device: auto, cpu, cuda (None: auto)
        resume: skip finished work (a retried or re-run step picks up where it stopped)
        latency_runs: export certificates: timed runs per latency cell
    """
    if step not in ("all", "prepare", "train", "gather"):
        raise ValueError(f"step must be all, prepare, train or gather, not {step!r}")
    if (step == "train") != (index is not None):
        raise ValueError("index is the train step's (and only its): the candidate it trains")
    root = run_dir or f"runs/{Path(recipe).stem if recipe else preset}"
    argv = ["sweep", "--step", step, *_recipe_flags(preset, recipe), *_flags(run_dir=root, data_dir=data_dir,
            target=target, budget_ms=budget_ms, index=index, device=device, resume=resume,
            latency_runs=latency_runs)]  # fmt: skip
    for c in candidates or []:
        argv += ["--candidate", c]
    job = name or (f"kdq-sweep-train-{index}" if step == "train" else f"kdq-sweep-{step}")
    return _app("sweep", [*argv, *kdq_args], image, "1x1", cpu, gpu, memMB, h, env, max_retries, mounts, 29500, job)
