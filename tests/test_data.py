import numpy as np
import pytest
import torch
from PIL import Image

from kdq.config import Augment
from kdq.data import (
    DataError,
    Normalize,
    augment,
    batch_crop,
    batch_flip,
    load_cifar,
    load_digits,
    load_image_folder,
    read_cifar_batch,
    shuffled_batches,
)

from .conftest import write_cifar_batch


def test_digits_loader_is_fixed_stratified_32x32(digits):
    assert digits.train.images.shape == (1437, 3, 32, 32) and digits.test.images.shape == (360, 3, 32, 32)
    assert digits.train.images.dtype == torch.uint8 and digits.train.labels.dtype == torch.long
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    again = load_digits()
    assert torch.equal(again.test.images, digits.test.images)  # fixed split
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])  # grey as RGB


def test_crop_shifts_each_sample_by_its_own_offset():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = batch_crop(x, torch.tensor([[0, 0], [1, -2]]), padding=2)
    assert torch.equal(out[0], x[0])  # zero shift: untouched
    padded = torch.nn.functional.pad(x[1:], (2, 2, 2, 2), mode="reflect")[0]
    assert torch.equal(out[1], padded[:, 3:11, 0:8])  # dy=+1, dx=-2


def test_random_crops_differ_per_sample_and_flips_are_mirrors():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1).clone()
    g = torch.Generator().manual_seed(0)
    out = augment(x, Augment(crop_padding=4, flip=False), g)
    distinct = {tuple(o.flatten()[:200].tolist()) for o in out}
    assert len(distinct) > 20  # same image in, many different crops out
    mask = torch.tensor([True, False] * 32)
    flipped = batch_flip(x, mask)
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])


def test_augment_does_not_touch_labels_or_dtype(tiny):
    labels = tiny.train.labels.clone()
    out = augment(tiny.train.images[:32], Augment(), torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == (32, 3, 32, 32)
    assert torch.equal(tiny.train.labels, labels)


def test_same_generator_seed_same_augmentation(tiny):
    a = augment(tiny.train.images[:16], Augment(), torch.Generator().manual_seed(3))
    b = augment(tiny.train.images[:16], Augment(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_shuffled_batches_cover_an_epoch_without_repeats():
    batches = list(shuffled_batches(100, 32, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [32, 32, 32]  # last partial batch dropped
    assert len(torch.cat(batches).unique()) == 96


def test_normalize_uses_given_stats():
    norm = Normalize([0.5] * 3, [0.25] * 3)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(norm(x), torch.full((1, 3, 2, 2), 2.0))


def test_cifar_parser_reads_generated_batches(tmp_path):
    data, labels = write_cifar_batch(tmp_path / "b", 5, seed=7)
    images, y = read_cifar_batch(tmp_path / "b")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images.reshape(5, -1), torch.from_numpy(data)) and y.tolist() == labels


def test_cifar_tree_loads_without_verification(fake_cifar):
    ds = load_cifar("cifar10", fake_cifar, verify=False)
    assert len(ds.train) == 40 and len(ds.test) == 8 and ds.classes[0] == "airplane"


def test_cifar_md5_mismatch_is_a_one_line_error(fake_cifar):
    with pytest.raises(DataError, match="md5 mismatch") as e:
        load_cifar("cifar10", fake_cifar)  # generated files cannot match the real sums
    assert "\n" not in str(e.value) and "re-download" in str(e.value)


def test_cifar_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_cifar("cifar10", tmp_path)


def test_cifar_truncated_batch_is_refused(fake_cifar):
    path = fake_cifar / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_cifar("cifar10", fake_cifar, verify=False)


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "b").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_batch(tmp_path / "b")
    assert not (tmp_path / "pwned").exists()


def _write_png(path, color, mode="RGB", size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_resizes_and_splits(tmp_path):
    for c, color in [("cat", (255, 0, 0)), ("dog", (0, 0, 255))]:
        for i in range(10):
            _write_png(tmp_path / c / f"{i}.png", color)
    _write_png(tmp_path / "dog" / "grey.png", 128, mode="L")  # grayscale is converted to RGB
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.train.images.shape[1:] == (3, 32, 32)
    assert len(ds.train) + len(ds.test) == 21
    red = ds.train.images[ds.train.labels == 0][0]
    assert red[0].float().mean() > 250 and red[2].float().mean() < 5


def test_image_folder_corrupt_image_names_the_file(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "a" / f"{i}.png", (1, 2, 3))
    bad = tmp_path / "a" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: cannot decode"):
        load_image_folder(tmp_path)


def test_normalization_stats_are_the_datasets_own(digits):
    mean, std = digits.normalization()
    x = digits.train.images.float() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-5) and len(std) == 3
