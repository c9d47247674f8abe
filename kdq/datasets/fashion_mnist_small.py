"""Writes kdq's embedded Fashion-MNIST (`kdq.data.load_fashion_mnist_small`) from the full dataset:

    python -m kdq.datasets.fashion_mnist_small          # needs Debian's dataset-fashion-mnist (or --data-dir)

The training images are `kdq.data.subset_training`'s class-balanced subset, the very images that
`--dataset fashion-mnist --train-subset 3000` trains on; the test files are the originals, byte for byte.
Idx files, gzipped, as Zalando ships them. Fashion-MNIST is MIT licensed (Zalando SE); so is this copy.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

from kdq.data import FASHION_MNIST_SMALL, fashion_mnist_folder, load_fashion_mnist, subset_training

TRAIN_IMAGES = 3000  # 300 a class: the demo's budget (recipes/demo.toml says why)


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array as an idx file: magic 0, 0, 0x08, ndim, then each dimension as a big-endian int32."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write(data_dir: Path, out: Path = FASHION_MNIST_SMALL) -> None:
    full = load_fashion_mnist(data_dir)
    train = subset_training(full, TRAIN_IMAGES).train
    images = train.images[:, 0, 2:-2, 2:-2].numpy()  # back to 28x28 grayscale: the loader pads and repeats
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", train.labels.numpy())):
        # mtime=0: on the same Python, the same images give the same bytes and a rebuild leaves git nothing to commit
        (out / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array.astype(np.uint8)), 9, mtime=0))
    source = fashion_mnist_folder(data_dir)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = source / f"{name}.gz"
        if src.is_file():
            shutil.copyfile(src, out / src.name)
        else:
            (out / src.name).write_bytes(gzip.compress((source / name).read_bytes(), 9, mtime=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="as kdq's --data-dir")
    parser.add_argument("--out", type=Path, default=FASHION_MNIST_SMALL)
    args = parser.parse_args()
    write(args.data_dir, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
