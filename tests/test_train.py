import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdq import checkpoint as ck
from kdq.config import Augment, Optim
from kdq.models import build_model
from kdq.presets import get_preset
from kdq.train import Distill, Runtime, TrainingError, fit

from .conftest import same_weights

ARCH = {"name": "mobilenet_v2", "num_classes": 10, "kwargs": {"width_mult": 0.35, "dropout": 0.1}}
CPU = Runtime(torch.device("cpu"))
PRESET = get_preset("demo").to_dict()


def student():
    torch.manual_seed(0)
    return build_model("mobilenet_v2", 10, **ARCH["kwargs"])


def run(tiny, out, epochs, **kw):
    optim = Optim(epochs=kw.pop("total_epochs", epochs), lr=0.05, batch_size=32)
    return fit(
        student(),
        ARCH,
        tiny,
        optim,
        Augment(crop_padding=2, flip=False),
        out,
        stage="student",
        preset=PRESET,
        rt=CPU,
        **kw,
    )


def test_short_training_lowers_the_loss_and_writes_history(tiny, tmp_path):
    ckpt = run(tiny, tmp_path, 3)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert set(history[0]) >= {"lr", "train_acc", "epoch_seconds", "images_per_second"}
    assert "test_acc" not in history[0]  # training never scores the test split
    saved = ck.load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved[ck.DONE] and saved[ck.EPOCH] == 3 and saved[ck.CLASSES] == tiny.classes
    assert saved[ck.NORMALIZATION]["mean"] == pytest.approx(tiny.normalization()[0])
    assert saved[ck.PRESET]["name"] == "demo" and same_weights(saved[ck.MODEL], ckpt[ck.MODEL])


def test_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    """2 epochs straight == the epoch-1 checkpoint of the same run + resume + 1 epoch (CPU, bit-exact)."""
    saves = []
    real_save = ck.save_checkpoint

    def save_and_keep_epoch_1(obj, path):
        real_save(obj, path)
        if obj[ck.EPOCH] == 1:
            shutil.copy(path, tmp_path / "epoch1.pt")
        saves.append(obj[ck.EPOCH])

    monkeypatch.setattr(ck, "save_checkpoint", save_and_keep_epoch_1)
    straight = run(tiny, tmp_path / "a", 2)
    assert saves == [1, 2]
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "b" / "checkpoint.pt")  # the job died after epoch 1
    resumed = run(tiny, tmp_path / "b", 2, resume=True)
    assert resumed[ck.EPOCH] == 2 and saves == [1, 2, 2]
    assert same_weights(straight[ck.MODEL], resumed[ck.MODEL])
    assert straight[ck.HISTORY][1]["train_loss"] == resumed[ck.HISTORY][1]["train_loss"]


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader, as `tensorboard --logdir` uses it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_curves_are_the_history_and_a_resume_does_not_repeat_them(tiny, tmp_path, monkeypatch):
    kept = []
    real_save = ck.save_checkpoint

    def save_and_keep_epoch_1(obj, path):
        real_save(obj, path)
        if obj[ck.EPOCH] == 1 and not kept:
            kept.append(shutil.copy(path, tmp_path / "epoch1.pt"))

    monkeypatch.setattr(ck, "save_checkpoint", save_and_keep_epoch_1)
    tb = tmp_path / "tb" / "student"
    run(tiny, tmp_path / "a", 2, tensorboard=tb)
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    steps = len(tiny.train) // 32
    scalars = read_scalars(tb)
    for tag, key in {"loss/total": "train_loss", "loss/hard": "train_hard_loss", "accuracy/train": "train_acc",
                     "lr": "lr", "images_per_second": "images_per_second"}.items():  # fmt: skip
        assert [s for s, _ in scalars[tag]] == [steps, 2 * steps], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([h[key] for h in history], rel=1e-6), tag
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 2 * steps + 1))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "b" / "checkpoint.pt")  # died after epoch 1, resumed
    # TensorBoard reads a folder's event files in name order: <unix second>.<host>.<pid>.<writer count>. Within one
    # second, a process's 10th writer ("...10") sorts before its 9th: a resume is never that fast outside a test.
    time.sleep(1.05 - time.time() % 1)  # the next second: the resumed run's file sorts after the first
    run(tiny, tmp_path / "b", 2, resume=True, tensorboard=tb)
    again = read_scalars(tb)
    assert [s for s, _ in again["step/loss"]] == list(range(1, 2 * steps + 1))  # epoch 2 once, not twice
    assert [s for s, _ in again["accuracy/train"]] == [steps, 2 * steps]
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2


def test_existing_checkpoint_needs_resume_or_overwrite(tiny, tmp_path):
    run(tiny, tmp_path, 1)
    with pytest.raises(TrainingError, match="--resume .* --overwrite"):
        run(tiny, tmp_path, 1)


def test_offline_distillation_uses_soft_targets(tiny, tmp_path):
    soft = torch.randn(len(tiny.train), 10) * 5
    ckpt = run(tiny, tmp_path, 1, distill=Distill(alpha=0.7, soft_targets=soft))
    assert ckpt[ck.HISTORY][0]["train_soft_loss"] > 0
    with pytest.raises(TrainingError, match="soft targets cover"):
        run(tiny, tmp_path / "x", 1, distill=Distill(alpha=0.7, soft_targets=soft[:10]))


def test_online_distillation_runs_the_teacher(tiny, tmp_path):
    teacher = build_model("mobilenet_v2", 10, width_mult=0.35)
    ckpt = run(tiny, tmp_path, 1, distill=Distill(alpha=0.5, teacher=teacher))
    assert ckpt[ck.HISTORY][0]["train_soft_loss"] > 0
    assert all(not p.requires_grad for p in teacher.parameters())


def test_batch_larger_than_dataset_is_refused(tiny, tmp_path):
    with pytest.raises(TrainingError, match="batch size 999"):
        fit(
            student(),
            ARCH,
            tiny,
            Optim(epochs=1, lr=0.1, batch_size=999),
            Augment(),
            tmp_path,
            stage="s",
            preset=PRESET,
            rt=CPU,
        )


def test_torchrun_two_process_ddp(tmp_path):
    """2 CPU processes (gloo) through torchrun: one checkpoint, written by rank 0 only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kdq.cli",
        "baseline",
        "--preset",
        "fashion-mnist-cpu",
        "--run-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--width",
        "0.35",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "baseline").iterdir())
    assert files == ["checkpoint.pt", "history.json"]  # no stray temp files from rank 1
    saved = ck.load_checkpoint(tmp_path / "baseline" / "checkpoint.pt")
    assert saved[ck.EPOCH] == 1 and saved[ck.HISTORY][0]["train_acc"] > 0.1  # (test accuracy: chance after 1 epoch)
    assert proc.stderr.count("[baseline] epoch 1/1") == 1  # logged on rank 0 only


def test_checkpoint_keys_survive_a_round_trip(tiny, tmp_path):
    run(tiny, tmp_path, 1)
    model = ck.model_from_checkpoint(ck.load_checkpoint(tmp_path / "checkpoint.pt"))
    assert not model.training and Path(tmp_path / "checkpoint.pt").stat().st_size > 1e5
