"""Any input size: datasets resized once at load time, the stem chosen by size, the size recorded and checked.
The whole path at 96x96 (train, export, certificate, kdq-edge) is tests/test_edge.py's last test."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.config import CIFAR_STEM_MAX, stem_for
from kdq.data import fit_image, load_dataset, load_test_split, split_validation, subset_training
from kdq.device_data import DEVICE_DATA_FRACTION, TrainImages, fits_on
from kdq.models import build_model, load_start_weights, model_stem
from kdq.presets import get_preset
from kdq.recipes import RunOptions, load_data, stem_kwargs


def test_builtin_datasets_are_resized_once_and_stay_uint8(digits):
    big = load_dataset("digits", image_size=48)
    assert big.train.images.shape[1:] == (3, 48, 48) and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.labels, digits.train.labels) and len(big.test) == len(digits.test)
    assert torch.equal(load_dataset("digits").train.images, digits.train.images)  # 32: untouched


def test_folder_images_keep_their_aspect_ratio(tmp_path):
    """A wide image is not squeezed: its shorter side becomes the size and the center is kept."""
    pixels = np.zeros((60, 120, 3), np.uint8)
    pixels[:, 30:90] = 255  # a white center square between black bands
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    data = load_dataset("folder", tmp_path, image_size=40)
    assert data.train.images.shape[1:] == (3, 40, 40)
    assert data.train.images.float().mean() > 250  # only the white center survived (stretching keeps the bands)
    assert np.asarray(fit_image(Image.fromarray(pixels), 40)).shape == (40, 40, 3)


@pytest.mark.parametrize(
    "size, stem", [(16, "cifar"), (32, "cifar"), (64, "cifar"), (65, "imagenet"), (224, "imagenet")]
)
def test_the_stem_follows_the_input_size(size, stem):
    assert CIFAR_STEM_MAX == 64 and stem_for(size) == stem
    for arch in ("resnet20", "resnet18", "mobilenet_v2"):
        model = build_model(arch, 10, **stem_kwargs(size))
        assert model_stem(model) == stem
    assert stem_kwargs(32) == {}  # a 32 px model's arch record is what it always was


def test_imagenet_stem_keeps_its_pretrained_weights(tmp_path):
    from torchvision.models import mobilenet_v2

    torch.save(mobilenet_v2(width_mult=0.35).state_dict(), tmp_path / "w.pt")
    cifar = build_model("mobilenet_v2", 10, width_mult=0.35)
    imagenet = build_model("mobilenet_v2", 10, width_mult=0.35, stem="imagenet")
    assert "features.0.0.weight" in load_start_weights(cifar, "mobilenet_v2", str(tmp_path / "w.pt"))
    assert "features.0.0.weight" not in load_start_weights(imagenet, "mobilenet_v2", str(tmp_path / "w.pt"))


COMMON = ["--preset", "smoke", "--device", "cpu", "--train-subset", "200", "--no-tensorboard", "--epochs", "2"]


@pytest.fixture(scope="module")
def run_40px(tmp_path_factory) -> Path:
    """A smoke baseline trained on digits at 40 px."""
    run_dir = tmp_path_factory.mktemp("run-40px")
    result = CliRunner().invoke(main, ["baseline", *COMMON, "--run-dir", str(run_dir), "--image-size", "40"])
    assert result.exit_code == 0, result.output
    return run_dir


def test_a_run_at_one_size_is_not_resumed_or_taught_at_another(run_40px: Path, tmp_path: Path):
    saved = ck.load_checkpoint(run_40px / "baseline" / "checkpoint.pt")
    assert ck.input_size(saved) == 40 and saved[ck.RECIPE]["image_size"] == 40
    copy = tmp_path / "run"
    shutil.copytree(run_40px, copy)
    result = CliRunner().invoke(main, ["baseline", *COMMON, "--run-dir", str(copy), "--resume"])
    assert result.exit_code == 1 and "cannot resume with other settings (image_size 40 -> 32)" in result.output
    teacher = str(run_40px / "baseline" / "checkpoint.pt")
    argv = ["distill", *COMMON, "--run-dir", str(copy), "--teacher", teacher, "--online", "--stage", "s"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1 and "was trained on 40 px images, the data is 32 px: use --image-size 40" in (
        result.output
    )


def test_pt2e_quantizes_evaluates_and_exports_at_the_models_size(run_40px: Path, tmp_path: Path):
    """torch.export fixes the input's height and width: prepare, the cached converted model, the .pt2 and the
    dynamo ONNX export all take them from the checkpoint."""
    import onnx

    from kdq.pt2e_export import converted_cache, load_pt2

    int8 = tmp_path / "ptq" / "checkpoint.pt"
    cli = CliRunner()
    argv = ["quantize", str(run_40px / "baseline" / "checkpoint.pt"), "--flow", "pt2e", "--out", str(int8)]
    result = cli.invoke(main, argv)
    assert result.exit_code == 0, result.output
    result = cli.invoke(main, ["evaluate", str(int8), "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert converted_cache(int8).is_file()
    out = tmp_path / "export"
    result = cli.invoke(main, ["export", str(int8), "--target", "x86-pt2e", "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    graph_input = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in graph_input[1:]] == [3, 40, 40]
    program = load_pt2(out / "model.pt2")
    with torch.no_grad():
        assert program(torch.zeros(2, 3, 40, 40)).shape == (2, 10)
        with pytest.raises(Exception):  # noqa: B017 (torch.export's guard error types vary by version)
            program(torch.zeros(2, 3, 32, 32))


def test_streamed_batches_equal_the_batches_of_images_kept_on_the_device():
    """Streaming from host memory changes where a batch is gathered, not which images or in what order."""
    images = torch.randint(0, 256, (103, 3, 8, 8), dtype=torch.uint8)
    kept, streamed = (TrainImages(images, torch.device("cpu"), stream=s) for s in (False, True))
    a = list(kept.epoch(16, torch.Generator().manual_seed(3)))
    b = list(streamed.epoch(16, torch.Generator().manual_seed(3)))
    assert len(a) == len(b) == 103 // 16
    for (idx_a, x_a), (idx_b, x_b) in zip(a, b, strict=True):
        assert torch.equal(idx_a, idx_b) and torch.equal(x_a, x_b) and torch.equal(x_b, images[idx_b])
    assert len(torch.cat([idx for idx, _ in b]).unique()) == 6 * 16  # no image twice in an epoch


def test_images_stream_when_they_would_take_over_half_the_gpus_free_memory(monkeypatch, capsys):
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    free = {"bytes": 2 * images.numel()}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10**12))
    cuda = torch.device("cuda", 0)
    assert DEVICE_DATA_FRACTION == 0.5 and fits_on(images, cuda)
    free["bytes"] -= 1
    assert not fits_on(images, cuda)
    streamed = TrainImages(images, cuda)  # would raise on a CPU-only machine if it copied the images to the GPU
    assert streamed.stream and streamed.images is images
    assert "batches stream from host memory" in capsys.readouterr().err
    free["bytes"] += 1
    assert TrainImages(images, cuda, stream=True).stream  # asked for (gpu-check): no claim that they do not fit
    assert capsys.readouterr().err == ""
    assert fits_on(images, torch.device("cpu"))


def test_the_subset_and_the_validation_split_are_drawn_before_resizing_to_the_same_images():
    """load_data resizes only the images it keeps; the splits are those of the resized dataset."""
    preset = dataclasses.replace(get_preset("demo"), image_size=48, train_subset=500)
    data = load_data(preset, RunOptions())
    full = load_dataset(preset.dataset, image_size=48)
    expected = split_validation(subset_training(full, 500), preset.val_fraction, preset.seed)
    assert data.train.images.shape[1:] == (3, 48, 48) and len(data.train) + len(data.val) == 500
    for part in ("train", "val", "test"):
        got, want = getattr(data, part), getattr(expected, part)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels), part


def test_evaluation_reads_only_the_test_split_at_the_models_size():
    """kdq evaluate and the certificate need the test split only: at 224 px the training images would be GBs."""
    data = load_test_split("digits", image_size=48)
    assert len(data.train) == 0 and data.val is None
    assert torch.equal(data.test.images, load_dataset("digits", image_size=48).test.images)


def test_an_image_size_out_of_range_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["baseline", *COMMON, "--run-dir", str(tmp_path), "--image-size", "8"])
    assert result.exit_code == 2 and "--image-size" in result.output and "16<=x<=1024" in result.output


def test_a_folder_checkpoint_from_before_the_crop_is_refused(run_40px: Path, tmp_path: Path):
    """Before --image-size, class folders were stretched to 32x32 and checkpoints had no image_size."""
    ckpt = ck.load_checkpoint(run_40px / "baseline" / "checkpoint.pt")
    ckpt[ck.PRESET] = {k: v for k, v in ckpt[ck.PRESET].items() if k != "image_size"} | {"dataset": "folder"}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    result = CliRunner().invoke(main, ["evaluate", str(old), "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 1 and "stretched to 32x32 by a kdq older than --image-size" in result.output
    assert not (tmp_path / "e.json").exists()
