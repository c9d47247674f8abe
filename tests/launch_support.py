"""Helpers for the launch tests (components, Slurm, Kubernetes, container): platform checks, installs,
network namespaces, subprocesses with the project's virtualenv on PATH, and timings.

Policy: a test that needs something this machine cannot provide is skipped with the reason printed, except
under CI (CI=true), where it fails instead: CI runs as root on a Debian machine that can do all of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: torchx, torchrun, kdq live here
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
APT_UPDATED = False


def need(condition: bool, reason: str) -> None:
    """Skip (printing the reason) when the platform cannot run the test; fail instead under CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    print(f"SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def need_debian_fashion_mnist() -> None:
    """Debian's Fashion-MNIST files (`make setup` installs them): a missing dataset skips here, fails in CI."""
    need(Path("/usr/share/datasets/fashion-mnist").is_dir(), "apt-get install dataset-fashion-mnist")


def need_root_linux(what: str) -> None:
    need(sys.platform.startswith("linux"), f"{what} needs Linux")
    need(os.geteuid() == 0, f"{what} needs root (daemons, network namespaces, rootful podman)")


def which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin")


def ensure_packages(commands: dict[str, str], what: str) -> None:
    """apt-get install the Debian package of every command that is missing (root, apt)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if which(cmd) is None})
    if not missing:
        return
    need_root_linux(what)
    need(which("apt-get") is not None, f"{what} needs {', '.join(missing)} and there is no apt-get to install them")
    global APT_UPDATED
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not APT_UPDATED:
        run(["apt-get", "update", "-qq"], timeout=600, env=env)
        APT_UPDATED = True
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=1200, env=env)
    print(f"[launch] installed {' '.join(missing)} in {time.monotonic() - t0:.0f} s", file=sys.stderr)


def job_env(**extra: str) -> dict[str, str]:
    """This environment with the project's virtualenv first on PATH (TorchX jobs inherit it)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}:/usr/sbin:/sbin"
    env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, stdout and stderr together; on failure the assertion shows the command and its output."""
    argv = [str(a) for a in argv]
    t0 = time.monotonic()
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env if env is not None else job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode} after {elapsed:.0f} s: {' '.join(argv)}\n{proc.stdout[-6000:]}")
    print(f"[launch] {elapsed:6.1f} s  {' '.join(argv)[:160]}", file=sys.stderr)
    return proc


@contextlib.contextmanager
def netns(prefix: str = "kdq-test") -> Iterator[str]:
    """A fresh loopback-only network namespace (lo up, plus 127.0.0.2 so glibc resolves 127.0.0.1)."""
    need_root_linux("a loopback-only network namespace")
    ensure_packages({"ip": "iproute2", "nsenter": "util-linux"}, "network namespaces")
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", name], timeout=30)
    try:
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], timeout=30)
        run(["ip", "netns", "exec", name, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], timeout=30)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # only processes left in the namespace we made
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_netns(name: str, argv: Sequence[str | os.PathLike]) -> list[str]:
    """`nsenter --net` (not `ip netns exec`, which remounts /sys and hides cgroups from daemons)."""
    return ["nsenter", f"--net=/run/netns/{name}", "--", *[str(a) for a in argv]]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*/checkpoint.pt"))


def assert_checkpoint(run_dir: Path) -> Path:
    """The run directory holds a trained checkpoint (a plain dict with the model's weights)."""
    import torch

    found = checkpoints(run_dir)
    assert found, f"no */checkpoint.pt under {run_dir}: {sorted(p.name for p in run_dir.rglob('*'))}"
    ckpt = torch.load(found[-1], map_location="cpu", weights_only=False)
    assert isinstance(ckpt, dict) and "model" in ckpt, f"{found[-1]} is not a kdq checkpoint: {type(ckpt)}"
    return found[-1]
