"""Shared fixtures: small real data (digits) and CIFAR-format files generated on the fly."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdq.data import CIFAR10_CLASSES, Dataset, Split, load_digits
from tests.targets import SMOKE_TARGET

# Tests whose int8 arithmetic depends on the CPU kind: CI runs them in both identities (Makefile: test-other-cpu).
# Not the ExecuTorch ones (fixture mobile_run): XNNPACK widens to int32 on every x86 CPU and KDQ_CPU does not steer it.
CPU_KIND_MODULES = ("test_certificate", "test_quant_export", "test_pt2e", "test_edge")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the session's smoke pipeline run (directly or through another fixture) are marked
    `pipeline`: `make test-python` runs the others on a second Python version within CI's time. The tests of
    the CPU-dependent modules are marked `cpu_kind`."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "smoke_run" in fixtures:
            item.add_marker(pytest.mark.pipeline)
        if item.module.__name__.rpartition(".")[2] in CPU_KIND_MODULES and "mobile_run" not in fixtures:
            item.add_marker(pytest.mark.cpu_kind)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture(scope="session")
def tiny(digits: Dataset) -> Dataset:
    """256 training and 128 test digits: enough to learn something in seconds."""
    return Dataset(
        "digits",
        Split(digits.train.images[:256], digits.train.labels[:256]),
        Split(digits.test.images[:128], digits.test.labels[:128]),
        digits.classes,
    )


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """A CIFAR-10 python batch with the real layout: dict with 'data' (N, 3072) uint8 and 'labels'."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({"batch_label": f"batch {seed}", "labels": labels, "data": data, "filenames": []}, f)
    return data, labels


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    """A CIFAR-10 tree (5 train batches + test batch, 8 images each) under tmp_path; returns the root."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    for i, (name, _) in enumerate(CIFAR10.train_list + CIFAR10.test_list):
        write_cifar_batch(folder / name, 8, seed=i)
    assert len(CIFAR10_CLASSES) == 10
    return tmp_path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchx_pipeline(run_dir: Path, log_dir: Path, *options: str) -> str:
    """`torchx run -s local_cwd components.py:pipeline --preset smoke --run_dir RUN_DIR OPTIONS` from the repo root,
    as a user types it: the TorchX job runs `kdq pipeline` itself. Returns the job's output (TorchX's and kdq's)."""
    from tests.launch_support import REPO, VENV_BIN, run

    argv = [VENV_BIN / "torchx", "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}", "components.py:pipeline",
            "--preset", "smoke", "--run_dir", run_dir, "--device", "cpu", *options]  # fmt: skip
    out = run(argv, cwd=REPO, timeout=1200).stdout
    assert "Job finished: SUCCEEDED" in out, out[-3000:]
    return out + "".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).rglob("*.log")))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The TorchX pipeline job on the smoke recipe, once per session (a minute of training on the digits), from
    scratch; every test of the artifacts reads its run. Returns RUN."""
    root = tmp_path_factory.mktemp("smoke")
    torchx_pipeline(root / "run", root / "logs", "--target", str(SMOKE_TARGET), "--", "--latency-runs", "3")
    return root / "run"


@pytest.fixture(scope="session")
def smoke_sweep(smoke_run, tmp_path_factory) -> Path:
    """`kdq sweep --budget-ms 0.3` on the smoke recipe with one candidate (ResNet-8), starting from the smoke
    run's teacher and soft targets (kept by --resume: a sweep trains them once, and here they already are).
    Returns RUN; tests/test_slurm.py resumes a copy of it with a second candidate."""
    import shutil

    from tests.launch_support import VENV_BIN, run

    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    shutil.copytree(smoke_run / "teacher", run_dir / "teacher")
    shutil.copy2(smoke_run / "soft_targets.pt", run_dir / "soft_targets.pt")
    run([VENV_BIN / "kdq", "sweep", "--preset", "smoke", "--run-dir", run_dir, "--budget-ms", "0.3",
         "--candidate", "resnet8", "--target", SMOKE_TARGET, "--latency-runs", "3", "--device", "cpu", "--resume",
         "--no-tensorboard"], timeout=900)  # fmt: skip
    return run_dir
