"""Numbers a reviewer can trust: soft targets of the right teacher, QAT ranges untouched by evaluation, BN synced."""

import dataclasses
import shutil

import pytest
import torch

from kdq import checkpoint as ck
from kdq.artifacts import sha256
from kdq.data import Split, split_validation
from kdq.recipes import SOFT_TARGETS, RunOptions, soft_targets_for
from kdq.train import Runtime


def test_soft_targets_of_another_teacher_are_recomputed(smoke_run, digits, tmp_path):
    run = tmp_path / "run"
    teacher = run / "teacher" / "checkpoint.pt"
    teacher.parent.mkdir(parents=True)
    shutil.copy(smoke_run / "teacher" / "checkpoint.pt", teacher)
    opts, rt = RunOptions(device="cpu"), Runtime(torch.device("cpu"))
    first, key = soft_targets_for(teacher, digits, run, opts, rt)
    written = (run / SOFT_TARGETS).stat().st_mtime_ns
    again, same_key = soft_targets_for(teacher, digits, run, opts, rt)  # same teacher file: reused as is
    assert same_key == key and torch.equal(again, first) and (run / SOFT_TARGETS).stat().st_mtime_ns == written

    ckpt = ck.load_checkpoint(teacher)  # the teacher retrained (--overwrite, another --seed): other weights
    ckpt[ck.MODEL] = {k: v * 0.5 if v.is_floating_point() else v for k, v in ckpt[ck.MODEL].items()}
    ck.save_checkpoint(ckpt, teacher)
    fresh, new_key = soft_targets_for(teacher, digits, run, opts, rt)
    assert new_key["teacher_sha256"] == sha256(teacher) != key["teacher_sha256"]
    assert not torch.equal(fresh, first)
    assert ck.load_weights(run / SOFT_TARGETS, "soft targets")["teacher_sha256"] == new_key["teacher_sha256"]


def test_evaluating_a_qat_model_leaves_its_quantization_ranges_alone(tiny):
    """FakeQuantize observers run in eval mode too: per-epoch evaluation must not feed them evaluation images."""
    from kdq.data import Normalize
    from kdq.models import build_model
    from kdq.quant import get_flow
    from kdq.train import _accuracy

    torch.manual_seed(0)
    model = get_flow("eager").prepare(build_model("mobilenet_v2", 10, width_mult=0.35), "x86", qat=True)
    with torch.no_grad():  # ranges from a few training images, as after some QAT steps
        model(Normalize(*tiny.normalization())(tiny.train.images[:32]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _accuracy(model, tiny.test, Normalize(*tiny.normalization()), Runtime(torch.device("cpu")))
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == [] and model.training


@pytest.mark.parametrize("qat", [False, True])
def test_data_parallel_batchnorm_is_synchronized_on_gpus_too(qat):
    """Under DDP every BatchNorm must see the global batch: nn.SyncBatchNorm on CUDA (the conversion itself needs
    no GPU), kdq's all-reduce BN on CPU; parameters and state_dict keys stay those of the plain model."""
    from torch import nn

    from kdq.models import build_model
    from kdq.quant import get_flow
    from kdq.train import _CpuSyncBatchNorm, sync_batchnorm

    def model():
        torch.manual_seed(0)
        m = build_model("mobilenet_v2", 10, width_mult=0.35)
        return get_flow("eager").prepare(m, "x86", qat=True) if qat else m

    for device, kind in (("cuda", nn.SyncBatchNorm), ("cpu", _CpuSyncBatchNorm)):
        plain, synced = model(), sync_batchnorm(model(), torch.device(device))
        bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, kind) for m in bns), device
        assert list(synced.state_dict()) == list(plain.state_dict())


# --- a validation split: model selection never sees the test split ---------------------------------------------


class _Untouchable(Split):
    """A test split that fails the test when training reads it."""

    def __getattribute__(self, name):
        if name in ("images", "labels"):
            raise AssertionError("training read the test split")
        return super().__getattribute__(name)


def test_validation_split_is_stratified_disjoint_and_fixed_by_the_seed(digits):
    data = split_validation(digits, 0.1, seed=0)
    assert len(data.train) + len(data.val) == len(digits.train) and data.test is digits.test
    per_class = torch.bincount(data.val.labels, minlength=10)
    assert per_class.tolist() == [round(0.1 * n) for n in torch.bincount(digits.train.labels, minlength=10).tolist()]
    rows = lambda s: {bytes(x.numpy()) for x in s.images.flatten(1)}  # noqa: E731
    assert not rows(data.train) & rows(data.val)  # no image in both
    again, other = split_validation(digits, 0.1, seed=0), split_validation(digits, 0.1, seed=1)
    assert torch.equal(again.val.images, data.val.images) and not torch.equal(other.val.images, data.val.images)
    assert split_validation(digits, 0.0, seed=0) is digits


def _fit(data, out, epochs, patience=0):
    from kdq.config import Augment, Optim
    from kdq.models import build_model
    from kdq.presets import get_preset
    from kdq.train import fit

    torch.manual_seed(0)
    arch = {"name": "mobilenet_v2", "num_classes": 10, "kwargs": {"width_mult": 0.35}}
    fit(build_model("mobilenet_v2", 10, width_mult=0.35), arch, data, Optim(epochs=epochs, lr=0.2, batch_size=32,
        patience=patience), Augment(crop_padding=2, flip=False), out, stage="student",
        preset=get_preset("demo").to_dict(), rt=Runtime(torch.device("cpu")))  # fmt: skip
    return ck.load_checkpoint(out / "checkpoint.pt")


def test_training_selects_and_stops_on_validation_and_never_reads_the_test_split(tiny, tmp_path):
    from kdq.data import Normalize
    from kdq.train import _accuracy

    untouchable = _Untouchable(tiny.test.images, tiny.test.labels)
    data = dataclasses.replace(split_validation(tiny, 0.25, seed=0), test=untouchable)
    saved = _fit(data, tmp_path / "a", epochs=5)
    history = saved[ck.HISTORY]
    assert all("val_acc" in h and "test_acc" not in h for h in history)
    best = max(history, key=lambda h: h["val_acc"])  # the first of equals
    assert saved[ck.SELECTED_EPOCH] == best["epoch"] and ck.BEST not in saved
    model = ck.model_from_checkpoint(saved)  # holds the best epoch's weights, not the last one's
    normalize = Normalize(**saved[ck.NORMALIZATION])
    assert _accuracy(model, data.val, normalize, Runtime(torch.device("cpu"))) == best["val_acc"]

    stopped = _fit(data, tmp_path / "b", epochs=5, patience=1)[ck.HISTORY]
    first_worse = next(i for i in range(1, 5) if stopped[i]["val_acc"] <= max(h["val_acc"] for h in stopped[:i]))
    assert len(stopped) == first_worse + 1  # early stopping watches the validation accuracy


def test_val_fraction_zero_trains_on_everything_without_early_stopping(tiny, tmp_path):
    data = dataclasses.replace(tiny, test=_Untouchable(tiny.test.images, tiny.test.labels))
    saved = _fit(data, tmp_path, epochs=3, patience=1)
    assert [set(h) & {"val_acc", "test_acc"} for h in saved[ck.HISTORY]] == [set()] * 3  # all 3 epochs, none scored
    assert ck.SELECTED_EPOCH not in saved


# --- one pipeline everywhere ---------------------------------------------------------------------------------------


def test_qat_trains_for_the_backend_asked(smoke_run, tmp_path):
    """`--backend qnnpack` is what `--target arm` exports; a float student has no backend to choose."""
    from click.testing import CliRunner

    from kdq.cli import main
    from kdq.quant import FLOAT_MODEL, QUANTIZATION

    run = tmp_path / "run"
    shutil.copytree(smoke_run / "teacher", run / "teacher")
    shutil.copytree(smoke_run / "student", run / "student")
    base = ["distill", "--preset", "smoke", "--device", "cpu", "--run-dir", str(run), "--epochs", "1"]
    r = CliRunner().invoke(main, [*base, "--backend", "qnnpack"])
    assert r.exit_code == 1 and "--backend and --flow apply to --qat training only" in r.output
    r = CliRunner().invoke(main, [*base, "--qat", "--backend", "qnnpack"])
    assert r.exit_code == 0, r.output
    saved = ck.load_checkpoint(run / "student_qat" / "checkpoint.pt")
    assert saved[QUANTIZATION]["backend"] == "qnnpack" and saved[FLOAT_MODEL] is not None  # from RUN/student


# --- every recipe knob is reachable, and does something ----------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """`kdq baseline` for one smoke epoch with the options given: (epoch-1 history entry, recorded preset)."""
    from click.testing import CliRunner

    from kdq.cli import main

    def train(*options: str) -> tuple[dict, dict]:
        run = tmp_path_factory.mktemp("knob")
        r = CliRunner().invoke(main, ["baseline", "--preset", "smoke", "--device", "cpu", "--epochs", "1",
                                      "--run-dir", str(run), *options])  # fmt: skip
        assert r.exit_code == 0, r.output
        saved = ck.load_checkpoint(run / "baseline" / "checkpoint.pt")
        return saved[ck.HISTORY][0], saved[ck.PRESET]

    return train


@pytest.mark.parametrize(
    "option, value, recorded",
    [
        ("--label-smoothing", "0.1", ("student_optim", "label_smoothing")),
        ("--cutmix", "1.0", ("augment", "cutmix_alpha")),
        ("--mixup", "0.2", ("augment", "mixup_alpha")),
        ("--momentum", "0.5", ("student_optim", "momentum")),
    ],
)
def test_every_recipe_knob_changes_the_training_step(one_epoch, option, value, recorded):
    plain, _ = one_epoch()
    changed, preset = one_epoch(option, value)
    assert preset[recorded[0]][recorded[1]] == float(value)  # recorded in the checkpoint's recipe
    assert changed["train_loss"] != plain["train_loss"]


def test_one_cycle_cycles_around_the_recipes_momentum():
    from kdq.config import Optim
    from kdq.train import make_scheduler

    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.5, nesterov=True)
    scheduler = make_scheduler(optimizer, Optim(epochs=2, lr=0.1, momentum=0.5), steps_per_epoch=10)
    seen = []
    for _ in range(19):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["momentum"])
    assert 0.45 - 1e-9 <= min(seen) < max(seen) <= 0.55 + 1e-9
