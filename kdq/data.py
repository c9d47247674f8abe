"""Datasets as uint8 tensors, and augmentation done on whole batches on the training device.

Every dataset becomes the same thing: `images` (N, 3, 32, 32) uint8 and `labels` (N,) int64 per split,
plus class names. Training moves the tensors to the device once; no DataLoader or PIL in the hot loop.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from kdq.config import DATASETS, Augment
from kdq.errors import KdqError

IMAGE_SIZE = 32
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(KdqError):
    """A dataset is missing, corrupt or unusable; the message says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    val: Split | None = None  # carved out of the training data by `split_validation`

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (stored with every checkpoint)."""
        x = self.train.images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def split_validation(data: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out `fraction` of each class of the training split as the validation split (fixed `seed`).

    Stratified, so that a small dataset keeps every class in both parts; the test split is untouched.
    `fraction` 0 returns `data` as it is (no validation split).
    """
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return data
    gen = torch.Generator().manual_seed(seed)
    val_idx = []
    for c in range(len(data.classes)):
        members = torch.nonzero(data.train.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val_idx.append(members[: round(fraction * len(members))])
    held_out = torch.zeros(len(data.train), dtype=torch.bool)
    held_out[torch.cat(val_idx)] = True
    if held_out.all() or not held_out.any():
        raise DataError(f"--val-fraction {fraction} leaves no training or no validation images")
    keep = ~held_out

    def part(mask: torch.Tensor) -> Split:
        return Split(data.train.images[mask], data.train.labels[mask])

    return dataclasses.replace(data, train=part(keep), val=part(held_out))


def load_dataset(name: str, root: Path | str = "data", download: bool = False) -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(Path(root), download=download)
    if name == "folder":
        return load_image_folder(Path(root))
    raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")


# --- scikit-learn digits: a real dataset that ships with a package, for offline runs -------------


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """1,797 8x8 handwritten digits, upscaled to 32x32x3, with a fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    x = (x * (255 / 16)).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=bunch.target, random_state=seed
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset(
        name="digits",
        train=Split(x[train_idx], y[train_idx]),
        test=Split(x[test_idx], y[test_idx]),
        classes=[str(d) for d in range(10)],
    )


# --- CIFAR-10: torchvision's download and md5 sums, our own tensor parser ------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what a batch holds (numpy arrays), never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one CIFAR-10 python batch file into (N, 3, 32, 32) uint8 images and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({e}); delete it and re-download") from e
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def load_cifar10(root: Path, download: bool = False, verify: bool = True) -> Dataset:
    """Load CIFAR-10 from `root/cifar-10-batches-py`, downloading it first if asked.

    Each batch's md5 is checked against torchvision's known sums *before* it is unpickled, so a
    tampered file is never parsed. Tests pass verify=False to read small generated batches.
    """
    folder = root / CIFAR10.base_folder
    if download:
        if not all(check_integrity(str(folder / f), md5) for f, md5 in CIFAR10.train_list + CIFAR10.test_list):
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 not found in {folder}; pass --download or set --data-dir to its parent")

    def read(files: list[list[str]]) -> Split:
        parts = []
        for filename, md5 in files:
            path = folder / filename
            if not path.is_file():
                raise DataError(f"{path} is missing; re-download CIFAR-10 with --download")
            if verify and not check_integrity(str(path), md5):
                raise DataError(
                    f"{path}: md5 mismatch ({path.stat().st_size} bytes: truncated, corrupt or modified); "
                    "delete it and re-download"
                )
            parts.append(read_cifar_batch(path))
        return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    return Dataset("cifar10", read(CIFAR10.train_list), read(CIFAR10.test_list), list(CIFAR10_CLASSES))


# --- bring your own: class folders (torchvision ImageFolder), resized to 32x32 --------------------


def _read_folder(folder: Path, classes: list[str] | None = None) -> tuple[Split, list[str]]:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    ds = ImageFolder(str(folder))
    if classes is not None and ds.classes != classes:
        raise DataError(f"{folder}: classes {ds.classes} differ from the training classes {classes}")
    images = []
    for path, _ in ds.samples:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                images.append(pil_to_tensor(im))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot decode image ({e.__class__.__name__}); fix or remove it") from e
    return Split(torch.stack(images), torch.tensor(ds.targets, dtype=torch.long)), ds.classes


def load_image_folder(root: Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """`root/train/<class>/*` and `root/test/<class>/*`, or `root/<class>/*` split stratified 80/20."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; give --data-dir a folder of class folders")
    try:
        if (root / "train").is_dir() and (root / "test").is_dir():
            train, classes = _read_folder(root / "train")
            test, _ = _read_folder(root / "test", classes)
            return Dataset("folder", train, test, classes)
        from sklearn.model_selection import train_test_split

        every, classes = _read_folder(root)
    except FileNotFoundError as e:  # ImageFolder: no class folders or no images
        raise DataError(f"{root}: {e}") from e
    train_idx, test_idx = train_test_split(
        np.arange(len(every)), test_size=test_fraction, stratify=every.labels.numpy(), random_state=seed
    )
    pick = lambda idx: Split(every.images[idx], every.labels[idx])  # noqa: E731
    return Dataset("folder", pick(torch.from_numpy(train_idx)), pick(torch.from_numpy(test_idx)), classes)


# --- batched augmentation and batching on the device -------------------------------------------


def batch_crop(images: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Translate each image by its own (dy, dx) in [-padding, padding], reflect-padded, in one gather.

    images: (N, C, H, W); shifts: (N, 2) integer tensor.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = torch.arange(h, device=images.device) + (padding + shifts[:, :1])  # (N, H)
    cols = torch.arange(w, device=images.device) + (padding + shifts[:, 1:])  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def batch_flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose `mask` entry is True (N,), leave the rest untouched."""
    return torch.where(mask[:, None, None, None], images.flip(3), images)


def augment(images: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random crop and flip with parameters drawn per sample from `generator` (on the images' device)."""
    n, dev = len(images), images.device
    if aug.crop_padding:
        p = aug.crop_padding
        shifts = torch.randint(-p, p + 1, (n, 2), generator=generator, device=dev)
        images = batch_crop(images, shifts, p)
    if aug.flip:
        images = batch_flip(images, torch.rand(n, generator=generator, device=dev) < 0.5)
    return images


class Normalize:
    """uint8 (N,3,H,W) -> normalized float, channels_last: the one preprocessing used everywhere."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch; the last partial batch is dropped so DDP shards stay equal."""
    perm = torch.randperm(n, generator=generator, device=generator.device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]
