"""The container image, for real: hadolint, `make image` (podman build of the Dockerfile on a Debian base
made with debootstrap: no registry is reachable here), `podman run IMAGE kdq --help`, a tiny demo-preset
QAT training inside the container, and `torchx run -s local_docker` through podman's Docker-compatible
API socket (served from a loopback-only network namespace) exporting the model that training produced.

Cached between runs on the same machine: the base image, podman's layer cache (the dependency layer is
rebuilt only when uv.lock changes) and uv's download cache (a build cache mount).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.launch_support import (
    REPO,
    VENV_BIN,
    assert_checkpoint,
    ensure_packages,
    job_env,
    need_root_linux,
    run,
)

IMAGE = "localhost/kdq:test"
BASE = "localhost/kdq-base:bookworm"
CONF = REPO / "deploy/container/containers.conf"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SMOKE_TARGET = Path(__file__).parent / "smoke-target.toml"
PACKAGES = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap", "runc": "runc"}


def podman_env(**extra: str) -> dict[str, str]:
    return job_env(CONTAINERS_CONF=str(CONF), **extra)


def test_hadolint_is_clean():
    out = run([VENV_BIN / "hadolint", "--failure-threshold", "info", REPO / "Dockerfile"], timeout=60, check=False)
    assert out.returncode == 0, out.stdout


@pytest.fixture(scope="module")
def image():
    """`make image` on a debootstrap'd Debian base (both cached on this machine after the first run)."""
    need_root_linux("rootful podman and debootstrap")
    ensure_packages(PACKAGES, "the container tests")
    env = podman_env()
    run([REPO / "deploy/container/base-image.sh", BASE], env=env, timeout=900)
    make = ["make", "-C", REPO, "image", f"IMAGE={IMAGE}", f"BASE={BASE}"]
    if CA_BUNDLE.is_file():  # registries behind an intercepting proxy (this machine): the host's CA bundle
        make.append(f"CA_BUNDLE={CA_BUNDLE}")
    run(make, env=env, timeout=1500)
    # A rebuilt image leaves the previous one dangling (GBs): drop those; the cache of the new one stays.
    # Housekeeping only: an image held by a container of an interrupted build stays, and that is no failure.
    run(["podman", "image", "prune", "-f"], env=env, timeout=300, check=False)
    return IMAGE


def podman(*args: str | os.PathLike, timeout: float = 120) -> str:
    return run(["podman", *args], env=podman_env(), timeout=timeout).stdout


def test_kdq_help_in_the_container(image):
    out = podman("run", "--rm", "--network=none", image, "kdq", "--help")
    assert "distill" in out and "export" in out
    assert "Usage: kdq" in podman("run", "--rm", "--network=none", image)  # the default command
    assert podman("run", "--rm", "--network=none", image, "id", "-u").strip() == "1000"  # not root


def test_the_image_holds_this_checkout_of_kdq(image):
    """A rebuilt image must not keep a cached, older kdq: every module's bytes equal the checkout's."""
    digest = "import hashlib, json, pathlib, kdq; d = pathlib.Path(kdq.__file__).parent; print(json.dumps({p.name: " \
             "hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob('*.py')}))"  # fmt: skip
    inside = json.loads(podman("run", "--rm", "--network=none", image, "python", "-c", digest).strip().splitlines()[-1])
    here = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (REPO / "kdq").glob("*.py")}
    assert inside == here


@pytest.fixture(scope="module")
def trained(image, tmp_path_factory) -> Path:
    """The smoke preset's float student, then its QAT fine-tuning, trained inside the container (a bind-mounted
    folder): a QAT checkpoint that records its float reference, as the export's accuracy gates need."""
    runs = tmp_path_factory.mktemp("container-runs")
    runs.chmod(0o777)  # the container runs as uid 1000
    for qat in ([], ["--qat", "--init", "runs/smoke/baseline/checkpoint.pt"]):  # --alpha 0: the baseline stage
        podman(
            "run", "--rm", "--network=none", "--cpus=2", "--memory=6g", "-v", f"{runs}:/workspace/runs", image,
            "kdq", "distill", "--preset", "smoke", "--alpha", "0", *qat, "--device", "cpu", "--run-dir", "runs/smoke",
            timeout=900,
        )  # fmt: skip
    shutil.copy(SMOKE_TARGET, runs / SMOKE_TARGET.name)  # the gates for a model trained for seconds
    return runs


def test_tiny_training_in_the_container(trained):
    checkpoint = assert_checkpoint(trained / "smoke")
    assert checkpoint.parent.name == "student_qat"


@pytest.fixture(scope="module")
def docker_host(image):
    """podman's Docker-compatible API on a unix socket, served from its own loopback-only namespace."""
    script = REPO / "deploy/container/docker-socket.sh"
    env = podman_env(KDQ_PODMAN_SOCKET="/run/kdq-podman-test.sock", KDQ_PODMAN_NETNS="kdq-podman-test")
    try:
        out = run([script, "start"], env=env, timeout=120).stdout
        yield re.search(r"DOCKER_HOST=(\S+)", out).group(1)
    finally:
        run([script, "stop"], env=env, timeout=120, check=False)
        # TorchX's containers (finished) stay listed in podman until removed.
        ids = run(["podman", "ps", "-aq", "--filter", "label=torchx.pytorch.org/version"], env=env, timeout=60)
        if ids.stdout.split():
            run(["podman", "rm", "-f", *ids.stdout.split()], env=env, timeout=120, check=False)
        assert not Path("/run/kdq-podman-test.pid").exists() and not Path("/run/netns/kdq-podman-test").exists()


def test_local_docker_through_the_podman_socket(docker_host, trained, tmp_path):
    """`torchx run -s local_docker components.py:export` on the checkpoint trained in the container."""
    env = podman_env(DOCKER_HOST=docker_host)
    out = run(
        [VENV_BIN / "torchx", "run", "-s", "local_docker", "--workspace", "", "components.py:export",
         "--image", IMAGE, "--checkpoint", "/workspace/runs/smoke/student_qat/checkpoint.pt",
         "--target", f"/workspace/runs/{SMOKE_TARGET.name}",
         "--mounts", f"type=bind,src={trained},dst=/workspace/runs", "--latency_runs", "1"],
        cwd=REPO, env=env, timeout=900,
    ).stdout  # fmt: skip
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    handle = re.search(r"local_docker://torchx/[\w-]+", out).group(0)
    export_dir = trained / "smoke" / f"export-{SMOKE_TARGET.stem}"
    assert (export_dir / "model.pt").is_file() and (export_dir / "model.onnx").is_file(), list(export_dir.iterdir())
    certificate = json.loads((export_dir / "manifest.json").read_text())["certificate"]
    assert certificate["passed"] and "avx2" in certificate["paths"]
    # ONNX Runtime's AVX2 path ran under the image's qemu exactly where it is not this CPU's (or identity's) own
    emulated = certificate["path_runs"]["avx2"]["onnxruntime_int8"] == "onnxruntime_int8@avx2"
    assert emulated == ("qemu-x86_64" in certificate["paths"]["avx2"]), certificate["paths"]
    status = run([VENV_BIN / "torchx", "status", handle], env=env, timeout=60).stdout
    assert "State: SUCCEEDED" in status, status
    logs = run([VENV_BIN / "torchx", "log", handle], env=env, timeout=60).stdout
    assert "export/0" in logs, logs[-2000:]
