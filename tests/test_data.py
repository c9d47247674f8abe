import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdq.config import Augment
from kdq.data import (
    FASHION_MNIST_SMALL,
    DataError,
    Normalize,
    augment,
    batch_crop,
    batch_flip,
    load_cifar,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_fashion_mnist_small,
    load_image_folder,
    read_cifar_batch,
    shuffled_batches,
    subset_training,
)
from kdq.datasets.fashion_mnist_small import write

from .conftest import write_cifar_batch
from .launch_support import need_debian_fashion_mnist


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


def test_evaluation_reads_only_the_test_images_of_a_folder(tmp_path, monkeypatch):
    """`kdq evaluate` and the certificate read class folders through load_test_split: the test images only, the
    same ones as training's split, at the model's size. At 224 px every training image read would cost 147 KB."""
    import PIL.Image

    from kdq.data import load_test_split

    for c, color in [("cat", (255, 0, 0)), ("dog", (0, 0, 255))]:
        for i in range(10):
            _write_png(tmp_path / "flat" / c / f"{i}.png", color, size=(40 + i, 40))
            _write_png(tmp_path / "split" / ("test" if i < 3 else "train") / c / f"{i}.png", color)
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    for layout in ("flat", "split"):
        whole = load_image_folder(tmp_path / layout, image_size=48)
        opened.clear()
        test = load_test_split("folder", tmp_path / layout, image_size=48)
        assert len(opened) == len(whole.test) == len(test.test) and len(test.train) == 0, (layout, opened)
        assert torch.equal(test.test.images, whole.test.images) and torch.equal(test.test.labels, whole.test.labels)
    (tmp_path / "split" / "train" / "cat" / "0.png").write_bytes(b"not a png")  # never opened: no error
    assert len(load_test_split("folder", tmp_path / "split").test) == 6


def test_normalization_stats_are_the_datasets_own(digits):
    mean, std = digits.normalization()
    x = digits.train.images.float() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-5) and len(std) == 3


# --- Fashion-MNIST: generated idx files in torchvision's layout and Debian's ---------------------------------


def write_idx(path, array: np.ndarray) -> None:
    """An idx file as the originals are: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 sizes, the bytes."""
    raw = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_fashion(folder, n_train=20, n_test=10, gz=True) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    for prefix, images in (("train", train), ("t10k", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(len(images)) % 10).astype(np.uint8))
    return train


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_is_padded_to_32x32_and_grey_as_rgb(tmp_path, gz):
    """torchvision's layout (root/FashionMNIST/raw), gzipped as downloaded or extracted: 2 px of black around
    every 28x28 image, the channel repeated; labels as stored."""
    train = fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=gz)
    ds = load_fashion_mnist(tmp_path, verify=False)
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert torch.equal(ds.train.images[:, 1, 2:30, 2:30], torch.from_numpy(train))
    border = ds.train.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0 and torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])
    assert ds.train.labels.tolist() == [i % 10 for i in range(20)] and ds.train.labels.dtype == torch.long


def test_fashion_mnist_checks_md5_of_the_idx_bytes(tmp_path):
    fake_fashion(tmp_path / "FashionMNIST" / "raw")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: md5 mismatch"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_falls_back_to_debians_folder_then_says_how_to_get_it(tmp_path, monkeypatch):
    import kdq.data

    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(kdq.data, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(DataError, match="pass --download, or install it: apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "data")
    fake_fashion(debian, n_train=30)
    assert len(load_fashion_mnist(tmp_path / "data", verify=False).train) == 30


def test_fashion_mnist_download_fetches_torchvisions_files(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    import kdq.data

    calls = []

    def fake_download(url, folder, filename, md5):
        calls.append((url, filename, md5))
        fake_fashion(Path(folder))

    monkeypatch.setattr(kdq.data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    monkeypatch.setattr(kdq.data, "download_and_extract_archive", fake_download)
    load_fashion_mnist(tmp_path, download=True, verify=False)
    assert [(f, m) for _, f, m in calls] == list(FashionMNIST.resources)
    assert calls[0][0].startswith(FashionMNIST.mirrors[0]) and (tmp_path / "FashionMNIST" / "raw").is_dir()


def test_truncated_idx_file_is_a_one_line_error(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"
    fake_fashion(folder, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="bytes of data for shape"):
        load_fashion_mnist(tmp_path, verify=False)


def test_debians_fashion_mnist_is_the_real_one(tmp_path):
    """Debian's recompressed files hold the original idx bytes (md5 of the decompressed files checked)."""
    need_debian_fashion_mnist()
    ds = load_fashion_mnist(tmp_path)
    assert len(ds.train) == 60_000 and len(ds.test) == 10_000
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


def test_the_embedded_fashion_mnist_is_the_training_subset_and_the_whole_test_split(tmp_path):
    """kdq's shipped copy (`make demo`'s data) is `--train-subset 3000` of the real training images, and the
    original 10,000 test images; rebuilding it from Debian's files gives the same idx bytes (the gzip wrapper
    differs between Python versions: 3.11's gzip.compress writes another header than 3.10's)."""
    need_debian_fashion_mnist()
    small, full = load_fashion_mnist_small(), load_fashion_mnist(tmp_path)
    subset = subset_training(full, 3000)
    assert small.name == "fashion-mnist-small" and small.classes == full.classes
    assert torch.equal(small.train.images, subset.train.images) and torch.equal(small.train.labels, subset.train.labels)
    assert torch.equal(small.test.images, full.test.images) and torch.equal(small.test.labels, full.test.labels)
    assert torch.bincount(small.train.labels).tolist() == [300] * 10
    write(tmp_path, tmp_path / "rebuilt")
    for f in FASHION_MNIST_SMALL.iterdir():
        assert gzip.decompress((tmp_path / "rebuilt" / f.name).read_bytes()) == gzip.decompress(f.read_bytes()), f.name


def test_a_modified_embedded_fashion_mnist_is_refused(tmp_path, monkeypatch):
    import shutil

    import kdq.data

    copy = tmp_path / "fashion-mnist-small"
    shutil.copytree(FASHION_MNIST_SMALL, copy)
    monkeypatch.setattr(kdq.data, "FASHION_MNIST_SMALL", copy)
    labels = copy / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # one label changed
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: md5 mismatch.*reinstall kdq"):
        load_dataset("fashion-mnist-small")


# --- CIFAR-100: the python batches of CIFAR-10 with fine and coarse labels, and a meta file --------------------


def test_cifar100_reads_fine_labels_and_class_names(tmp_path):
    import pickle

    from torchvision.datasets import CIFAR100

    folder = tmp_path / CIFAR100.base_folder
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 12), ("test", 6)):
        fine = rng.integers(0, 100, n).tolist()
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine], "filenames": []}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []}, f)
    ds = load_cifar("cifar100", tmp_path, verify=False)
    assert ds.name == "cifar100" and len(ds.classes) == 100 and ds.classes[7] == "class7"
    assert ds.train.images.shape == (12, 3, 32, 32) and ds.train.labels.tolist() == batch_labels(folder / "train")
    with pytest.raises(DataError, match="md5 mismatch"):
        load_cifar("cifar100", tmp_path)


def batch_labels(path) -> list[int]:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)["fine_labels"]


def test_training_subset_is_stratified_and_the_same_for_every_seed(digits):
    sub = subset_training(digits, 200)
    assert len(sub.train) == 200 and torch.equal(sub.test.images, digits.test.images)
    assert torch.bincount(sub.train.labels, minlength=10).tolist() == [20] * 10
    assert torch.equal(subset_training(digits, 200).train.images, sub.train.images)
    with pytest.raises(DataError, match="train_subset must be in 1..1437"):
        subset_training(digits, 5000)
