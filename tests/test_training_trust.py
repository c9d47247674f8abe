"""Numbers a reviewer can trust: soft targets of the right teacher, QAT ranges untouched by evaluation, BN synced."""

import shutil

import pytest
import torch

from kdq import checkpoint as ck
from kdq.artifacts import sha256
from kdq.recipes import SOFT_TARGETS, RunOptions, _soft_targets_for
from kdq.train import Runtime


def test_soft_targets_of_another_teacher_are_recomputed(smoke_run, digits, tmp_path):
    run = tmp_path / "run"
    teacher = run / "teacher" / "checkpoint.pt"
    teacher.parent.mkdir(parents=True)
    shutil.copy(smoke_run / "teacher" / "checkpoint.pt", teacher)
    opts, rt = RunOptions(device="cpu"), Runtime(torch.device("cpu"))
    first, key = _soft_targets_for(teacher, digits, run, opts, rt)
    written = (run / SOFT_TARGETS).stat().st_mtime_ns
    again, same_key = _soft_targets_for(teacher, digits, run, opts, rt)  # same teacher file: reused as is
    assert same_key == key and torch.equal(again, first) and (run / SOFT_TARGETS).stat().st_mtime_ns == written

    ckpt = ck.load_checkpoint(teacher)  # the teacher retrained (--overwrite, another --seed): other weights
    ckpt[ck.MODEL] = {k: v * 0.5 if v.is_floating_point() else v for k, v in ckpt[ck.MODEL].items()}
    ck.save_checkpoint(ckpt, teacher)
    fresh, new_key = _soft_targets_for(teacher, digits, run, opts, rt)
    assert new_key["teacher_sha256"] == sha256(teacher) != key["teacher_sha256"]
    assert not torch.equal(fresh, first)
    assert ck.load_weights(run / SOFT_TARGETS, "soft targets")["teacher_sha256"] == new_key["teacher_sha256"]


def test_evaluating_a_qat_model_leaves_its_quantization_ranges_alone(tiny):
    """FakeQuantize observers run in eval mode too: per-epoch evaluation must not feed them evaluation images."""
    from kdq.data import Normalize
    from kdq.models import build_model
    from kdq.quant import get_flow
    from kdq.train import _test_accuracy

    torch.manual_seed(0)
    model = get_flow("eager").prepare(build_model("mobilenet_v2", 10, width_mult=0.35), "x86", qat=True)
    with torch.no_grad():  # ranges from a few training images, as after some QAT steps
        model(Normalize(*tiny.normalization())(tiny.train.images[:32]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _test_accuracy(model, tiny, Normalize(*tiny.normalization()), Runtime(torch.device("cpu")))
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
