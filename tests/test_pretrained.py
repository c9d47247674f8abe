"""Pretrained starts: torchvision's ImageNet weights through the torch hub cache, or a weights file; the CIFAR
stem is re-initialized. Every file here is generated locally (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from click.testing import CliRunner
from torchvision.models import get_model_weights, mobilenet_v2, resnet18

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.models import STEMS, WeightsError, build_model, load_start_weights, start_weights


def saved(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p)  # unlike any fresh init
    torch.save(model.state_dict(), path)
    return model.state_dict()


@pytest.mark.parametrize(
    "arch, torchvision_model, kwargs",
    [("mobilenet_v2", lambda: mobilenet_v2(width_mult=0.35), {"width_mult": 0.35}), ("resnet18", resnet18, {})],
)
def test_weights_file_loads_all_but_the_stem_and_a_classifier_of_another_size(
    tmp_path, arch, torchvision_model, kwargs
):
    file = tmp_path / "weights.pt"
    source = saved(torchvision_model(), file)  # ImageNet layout: 1000 classes, ImageNet stem
    model = build_model(arch, 10, **kwargs)
    fresh = load_start_weights(model, arch, str(file))
    state = model.state_dict()
    stem = {k for k in state if k.startswith(STEMS)}
    assert stem and stem <= set(fresh)
    for k, v in state.items():
        if k in fresh:
            assert k in stem or source.get(k) is None or source[k].shape != v.shape, k
            if k in source and source[k].shape == v.shape and k.endswith("weight"):  # buffers: both zeros/ones
                assert not torch.equal(v, source[k]), f"{k} must start fresh"
        else:
            assert torch.equal(v, source[k]), k
    classifier = "fc.weight" if "fc.weight" in state else "classifier.1.weight"
    assert classifier in fresh and state[classifier].shape[0] == 10
    assert len(fresh) < 0.1 * len(state)  # the body came from the file


def test_imagenet_weights_come_from_the_torch_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = get_model_weights("mobilenet_v2").IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = saved(mobilenet_v2(), cache / Path(url).name)

    def no_network(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    state = start_weights("mobilenet_v2_hires", "imagenet")
    assert state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in state)
    (cache / Path(url).name).unlink()
    with pytest.raises(WeightsError, match="not in the torch hub cache"):
        start_weights("mobilenet_v2_hires", "imagenet")


def test_weights_that_cannot_be_used_are_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="resnet20 has no ImageNet weights"):
        start_weights("resnet20", "imagenet")
    with pytest.raises(WeightsError, match="not found"):
        start_weights("resnet18", str(tmp_path / "nope.pt"))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    with pytest.raises(WeightsError, match="not a weights file"):
        start_weights("resnet18", str(tmp_path / "evil.pt"))
    saved(mobilenet_v2(width_mult=1.0), tmp_path / "wide.pt")
    with pytest.raises(WeightsError, match="no weights of .* fit mobilenet_v2"):
        load_start_weights(build_model("mobilenet_v2", 10, width_mult=0.35), "mobilenet_v2",
                           str(tmp_path / "wide.pt"))  # fmt: skip


def test_student_trains_from_a_weights_file_and_the_checkpoint_records_it(tmp_path):
    file = tmp_path / "imagenet-like.pt"
    saved(mobilenet_v2(width_mult=0.35), file)
    argv = ["baseline", "--preset", "smoke", "--device", "cpu", "--epochs", "1", "--train-subset", "300",
            "--no-tensorboard", "--weights", file, "--run-dir", tmp_path / "run"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    assert "[baseline] starting from" in result.output and "features.0.0" in result.output
    assert ck.load_checkpoint(tmp_path / "run" / "baseline" / "checkpoint.pt")[ck.PRESET]["student_weights"] == str(
        file
    )
    result = CliRunner().invoke(main, [str(a) for a in [*argv[:-2], "--pretrained", "--run-dir", tmp_path / "x"]])
    assert result.exit_code == 1 and "not both" in result.output
