"""Datasets as uint8 tensors, and augmentation done on whole batches on the training device.

Every dataset becomes the same thing: `images` (N, 3, S, S) uint8 and `labels` (N,) int64 per split, plus
class names; S is the recipe's `image_size` (32 by default). Training moves the tensors to the device once when
they fit (`kdq.device_data` says where the limit is); no DataLoader or PIL in the hot loop.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from kdq.config import DATASETS, Augment
from kdq.errors import KdqError

IMAGE_SIZE = 32
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(KdqError):
    """A dataset is missing, corrupt or unusable; the message says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8
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


def subset_training(data: Dataset, size: int) -> Dataset:
    """A class-balanced subset of `size` training images (round-robin over the classes, in an order fixed once,
    so that every seed of a benchmark trains on the same images); the test split is untouched. A class with
    fewer images than its share gives way to the others."""
    if not 0 < size <= len(data.train):
        raise DataError(f"train_subset must be in 1..{len(data.train)}, got {size}")
    if size == len(data.train):
        return data
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=gen)
    labels = data.train.labels[order]
    rank = torch.zeros_like(labels)  # each image's rank among the shuffled images of its class
    for c in range(len(data.classes)):
        members = labels == c
        rank[members] = torch.arange(int(members.sum()))
    keep = order[torch.argsort(rank * len(data.classes) + labels, stable=True)[:size]]  # round-robin over classes
    keep = keep.sort().values
    return dataclasses.replace(data, train=Split(data.train.images[keep], data.train.labels[keep]))


def load_dataset(
    name: str, root: Path | str = "data", download: bool = False, image_size: int = IMAGE_SIZE, resize: bool = True
) -> Dataset:
    """A dataset at `image_size` x `image_size`: class folders are read at that size (`load_image_folder`); the
    built-in datasets, square and 32x32 (digits upscaled, Fashion-MNIST padded), are resized once if it differs.
    `resize=False` leaves them at 32 px, for a caller that drops images first (a subset, a validation split) and
    then resizes fewer (`resized`): at 224 px every image takes 147 KB."""
    if name == "folder":
        return load_image_folder(Path(root), image_size=image_size)
    if name == "digits":
        data = load_digits()
    elif name in CIFARS:
        data = load_cifar(name, Path(root), download=download)
    elif name == "fashion-mnist":
        data = load_fashion_mnist(Path(root), download=download)
    elif name == "fashion-mnist-small":
        data = load_fashion_mnist_small()
    else:
        raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return resized(data, image_size) if resize else data


def resized(data: Dataset, size: int) -> Dataset:
    """Every split resized to `size` x `size` (bilinear, antialiased), once, kept as uint8. Chunks are written
    into one preallocated tensor: at 224 px a split is gigabytes, and concatenating chunks would hold it twice."""
    if data.train.images.shape[-1] == size:
        return data
    val = resized_split(data.val, size) if data.val is not None else None
    return dataclasses.replace(
        data, train=resized_split(data.train, size), test=resized_split(data.test, size), val=val
    )


def resized_split(s: Split, size: int) -> Split:
    """One split at `size` x `size`, filled chunk by chunk into one preallocated tensor."""
    if s.images.shape[-1] == size:
        return s
    out = s.images.new_empty(len(s.images), 3, size, size)
    for i in range(0, len(s.images), 1024):
        out[i : i + 1024] = TF.resize(s.images[i : i + 1024], [size, size], antialias=True)
    return Split(out, s.labels)


def load_test_split(
    name: str, root: Path | str = "data", download: bool = False, image_size: int = IMAGE_SIZE
) -> Dataset:
    """The dataset for evaluation: its test split at `image_size` and no training images. At 224 px, resizing
    Fashion-MNIST's 60,000 training images that evaluation never reads would take 9 GB."""
    if name == "folder":
        return load_image_folder(Path(root), image_size=image_size, test_only=True)
    data = load_dataset(name, root, download=download, image_size=image_size, resize=False)
    empty = Split(data.train.images.new_empty(0, 3, image_size, image_size), data.train.labels[:0])
    return dataclasses.replace(data, train=empty, val=None, test=resized_split(data.test, image_size))


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


# --- CIFAR-10 and CIFAR-100: torchvision's download and md5 sums, our own tensor parser --------------


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


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one CIFAR python batch file into (N, 3, 32, 32) uint8 images and int64 labels.

    CIFAR-10 batches hold `labels`; CIFAR-100's hold `fine_labels` (100 classes, read) and `coarse_labels`.
    """
    try:
        batch = _unpickle(path)
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        labels = np.asarray(batch["labels"] if "labels" in batch else batch["fine_labels"], dtype=np.int64)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({e}); delete it and re-download") from e
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


CIFARS = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # torchvision's file lists, md5 sums and URLs


def load_cifar(name: str, root: Path, download: bool = False, verify: bool = True) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 from torchvision's folder under `root`, downloading it first if asked.

    Each file's md5 is checked against torchvision's known sums *before* it is unpickled, so a
    tampered file is never parsed. Tests pass verify=False to read small generated files.
    """
    tv, title = CIFARS[name], name.upper().replace("CIFAR", "CIFAR-")
    folder = root / tv.base_folder
    files = [*tv.train_list, *tv.test_list, *([[tv.meta["filename"], tv.meta["md5"]]] if name == "cifar100" else [])]
    if download and not all(check_integrity(str(folder / f), md5) for f, md5 in files):
        download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    if not folder.is_dir():
        raise DataError(f"{title} not found in {folder}; pass --download or set --data-dir to its parent")
    for filename, md5 in files:
        path = folder / filename
        if not path.is_file():
            raise DataError(f"{path} is missing; re-download {title} with --download")
        if verify and not check_integrity(str(path), md5):
            raise DataError(
                f"{path}: md5 mismatch ({path.stat().st_size} bytes: truncated, corrupt or modified); "
                "delete it and re-download"
            )

    def read(batches: list[list[str]]) -> Split:
        parts = [read_cifar_batch(folder / filename) for filename, _ in batches]
        return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    if name == "cifar10":
        classes = list(CIFAR10_CLASSES)
    else:
        try:
            classes = list(_unpickle(folder / tv.meta["filename"])[tv.meta["key"]])
        except (OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
            raise DataError(f"{folder / tv.meta['filename']}: not a readable CIFAR-100 meta file ({e})") from e
    return Dataset(name, read(tv.train_list), read(tv.test_list), classes)


# --- Fashion-MNIST: torchvision's files and md5 sums; offline, Debian's dataset-fashion-mnist ------

# Debian recompresses the four .gz files (other gzip headers, so torchvision's md5 sums of the .gz files do not
# match) but the idx bytes inside are the originals: these are the md5 sums of the decompressed files.
FASHION_MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
# Shipped in kdq (Fashion-MNIST is MIT licensed): the training subset and the original test files.
FASHION_MNIST_SMALL = Path(__file__).parent / "datasets" / "fashion-mnist-small"
FASHION_MNIST_SMALL_MD5 = {
    "train-images-idx3-ubyte": "7339f66ec2b323c70767f1a438ce255a",
    "train-labels-idx1-ubyte": "abbd1baf2fb9cfcf56152b67bb48298b",
    "t10k-images-idx3-ubyte": FASHION_MNIST_IDX_MD5["t10k-images-idx3-ubyte"],
    "t10k-labels-idx1-ubyte": FASHION_MNIST_IDX_MD5["t10k-labels-idx1-ubyte"],
}


def _read_idx(path: Path, md5: str | None) -> np.ndarray:
    """An idx file (uint8 payload), plain or gzipped, checked against `md5`, that of its decompressed bytes."""
    fix = {
        DEBIAN_FASHION_MNIST: "reinstall it: apt-get install --reinstall dataset-fashion-mnist",
        FASHION_MNIST_SMALL: "reinstall kdq",
    }.get(path.parent, "delete it and re-download (--download)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable idx file ({e}); {fix}") from e
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{path}: md5 mismatch of its idx bytes (truncated, corrupt or modified); {fix}")
    ndim = raw[3] if len(raw) > 4 and raw[:3] == b"\0\0\x08" else 0  # magic: 0, 0, 0x08 (uint8), ndim
    if not ndim or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: not a uint8 idx file; {fix}")
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise DataError(f"{path}: {payload.size} bytes of data for shape {tuple(shape)}")
    return payload.reshape(tuple(shape))


def fashion_mnist_folder(root: Path, download: bool = False) -> Path:
    """Where the four files are: torchvision's `root/FashionMNIST/raw` (downloaded there with --download),
    else the Debian package's folder."""
    raw = root / FashionMNIST.__name__ / "raw"
    names = list(FASHION_MNIST_IDX_MD5)
    for folder in (raw, DEBIAN_FASHION_MNIST):
        if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    if download:
        for filename, md5 in FashionMNIST.resources:
            download_and_extract_archive(FashionMNIST.mirrors[0] + filename, str(raw), filename=filename, md5=md5)
        return raw
    raise DataError(
        f"Fashion-MNIST not found in {raw} or {DEBIAN_FASHION_MNIST}; pass --download, "
        "or install it: apt-get install dataset-fashion-mnist"
    )


def load_fashion_mnist(root: Path, download: bool = False, verify: bool = True) -> Dataset:
    """Zalando's Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale), as 32x32x3 (`read_idx_dataset`)."""
    md5s = FASHION_MNIST_IDX_MD5 if verify else dict.fromkeys(FASHION_MNIST_IDX_MD5)
    return read_idx_dataset("fashion-mnist", fashion_mnist_folder(root, download), md5s)


def load_fashion_mnist_small() -> Dataset:
    """The embedded Fashion-MNIST that `make demo` runs offline anywhere, the container included: a
    class-balanced 3,000 of the 60,000 training images (`kdq.datasets.fashion_mnist_small`) and all 10,000 test
    images (the original file), enough for the certificate to prove a 1 pt bound."""
    return read_idx_dataset("fashion-mnist-small", FASHION_MNIST_SMALL, FASHION_MNIST_SMALL_MD5)


def read_idx_dataset(name: str, folder: Path, md5s: dict[str, str | None]) -> Dataset:
    """Fashion-MNIST's four idx files in `folder`, as 32x32x3.

    Each image is padded by 2 black pixels on every side and its channel repeated three times. Padding, not
    resizing: every pixel stays exact (a resize to 32 blurs 1-px seams and straps), the garments keep their
    scale, and black is the images' own background. 32x32x3 is the input every kdq model, export target and
    edge app is built for; repeating the channel costs only the stem conv's 2 extra input channels.
    """

    def split(prefix: str) -> Split:
        files = {kind: folder / f"{prefix}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")}
        files = {k: p if p.is_file() else p.with_name(p.name + ".gz") for k, p in files.items()}
        images = torch.from_numpy(_read_idx(files["images-idx3-ubyte"], md5s[f"{prefix}-images-idx3-ubyte"]).copy())
        labels = _read_idx(files["labels-idx1-ubyte"], md5s[f"{prefix}-labels-idx1-ubyte"])
        labels = torch.from_numpy(labels.astype(np.int64))
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"{folder}: {prefix} images {tuple(images.shape)} do not match {len(labels)} labels")
        pad = (IMAGE_SIZE - images.shape[-1]) // 2
        images = F.pad(images, (pad,) * 4).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        return Split(images, labels)

    return Dataset(name, split("train"), split("t10k"), list(FashionMNIST.classes))


# --- bring your own: class folders (torchvision ImageFolder), at the model's input size ----------


def fit_image(im, size: int):
    """torchvision's `Resize(size)` then `CenterCrop(size)` on a PIL image: the shorter side becomes `size`
    (Pillow's bilinear filter), the longer one is cropped evenly, so no image is stretched. Edge apps
    (deploy/edge) repeat these exact steps, so a photo gives the model the pixels it was trained on."""
    return TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BILINEAR), [size, size])


def _folder_samples(folder: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder's (path, class index) list and class names, without opening an image."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), loader=lambda path: path)
    if classes is not None and ds.classes != classes:
        raise DataError(f"{folder}: classes {ds.classes} differ from the training classes {classes}")
    return ds.samples, ds.classes


def _read_images(samples: list[tuple[str, int]], size: int, desc: str) -> Split:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)  # filled in place: one copy in memory
    for i, (path, _) in enumerate(tqdm(samples, desc=f"reading {desc}", leave=False, disable=None)):
        try:
            with Image.open(path) as im:
                images[i] = pil_to_tensor(fit_image(im.convert("RGB"), size))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot decode image ({e.__class__.__name__}); fix or remove it") from e
    return Split(images, torch.tensor([label for _, label in samples], dtype=torch.long))


def _split_indices(labels: list[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The stratified train/test split of a single class-folder tree: a function of the labels alone, so the
    test images can be found (and read) without reading the training ones."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)


def load_image_folder(
    root: Path, test_fraction: float = 0.2, seed: int = 0, image_size: int = IMAGE_SIZE, test_only: bool = False
) -> Dataset:
    """`root/train/<class>/*` and `root/test/<class>/*`, or `root/<class>/*` split stratified 80/20; every image
    read once at `image_size` (`fit_image`). `test_only`: the test images only, the training split left empty
    (evaluation at 224 px would otherwise hold every training image in memory, 147 KB each)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; give --data-dir a folder of class folders")
    try:
        if (root / "train").is_dir() and (root / "test").is_dir():
            train_samples, classes = _folder_samples(root / "train")
            test_samples, _ = _folder_samples(root / "test", classes)
        else:
            every, classes = _folder_samples(root)
            train_idx, test_idx = _split_indices([label for _, label in every], test_fraction, seed)
            train_samples, test_samples = [every[i] for i in train_idx], [every[i] for i in test_idx]
    except FileNotFoundError as e:  # ImageFolder: no class folders or no images
        raise DataError(f"{root}: {e}") from e
    test = _read_images(test_samples, image_size, f"{root.name} test")
    train = _read_images([] if test_only else train_samples, image_size, f"{root.name} train")
    return Dataset("folder", train, test, classes)


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
