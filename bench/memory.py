"""Host memory to load a dataset at each input size, and the GPU memory that would hold it (`--image-size`).

    uv run --frozen python -m bench.memory                          # Fashion-MNIST at 32, 96 and 224 px
    uv run --frozen python -m bench.memory --preset demo --sizes 32 224

Each size loads in a fresh process, exactly as a training stage does (`kdq.recipes.load_data`: read, subset,
validation split, then resize). The peak is the process's maximum resident set (`getrusage` ru_maxrss) minus
its resident set after the imports, so it counts what loading added, not torch's libraries. The uint8 bytes
are the tensors' own sizes; "GPU free memory to keep them" is those bytes over `kdq.device_data`'s
`DEVICE_DATA_FRACTION`: with less free memory, training streams batches from host memory.
Prints the table and writes bench/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Table, print_table, run_alone


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_one(preset_name: str, size: int, data_dir: str) -> dict:
    """In this process: load the preset's data at `size` and report what it took."""
    from kdq.config import with_overrides
    from kdq.presets import get_preset
    from kdq.recipes import RunOptions, load_data

    before = resident_bytes()
    t0 = time.perf_counter()
    data = load_data(with_overrides(get_preset(preset_name), image_size=size), RunOptions(data_dir=Path(data_dir)))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    splits = {name: s for name in ("train", "val", "test") if (s := getattr(data, name)) is not None}
    return {
        "image_size": size,
        "images": {name: len(s) for name, s in splits.items()},
        "uint8_bytes": {name: s.images.numel() for name, s in splits.items()},
        "peak_added_bytes": peak - before,
        "seconds": seconds,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="fashion-mnist", help="a built-in preset (its dataset and split)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one size, JSON out


def run(args: argparse.Namespace) -> dict:
    from kdq.device_data import DEVICE_DATA_FRACTION

    rows = []
    for size in args.sizes:
        cmd = [sys.executable, "-m", "bench.memory", "--preset", args.preset, "--data-dir", args.data_dir,
               "--one", str(size)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {"preset": args.preset, "device_data_fraction": DEVICE_DATA_FRACTION, "sizes": rows}


def tables(result: dict) -> list[Table]:
    fraction = result["device_data_fraction"]
    rows = []
    for r in result["sizes"]:
        train = r["uint8_bytes"]["train"]
        total = sum(r["uint8_bytes"].values())
        rows.append([f"{r['image_size']} px", f"{sum(r['images'].values()):,}", f"{total / 1e9:.2f}",
                     f"{r['peak_added_bytes'] / 1e9:.2f}", f"{r['peak_added_bytes'] / total:.2f}",
                     f"{train / fraction / 1e9:.1f}", f"{r['seconds']:.0f}"])  # fmt: skip
    return [Table(
        f"Loading `{result['preset']}` at each input size (train + validation + test, uint8)",
        ["size", "images", "uint8 GB", "peak host GB added", "peak / uint8", "GPU free GB to keep train", "load s"],
        rows,
        f"Training keeps the training images on the GPU when they take at most {fraction:.0%} of its free memory "
        "(kdq.device_data); otherwise batches stream from host memory.",
    )]  # fmt: skip


def show(result: dict) -> None:
    for table in tables(result):
        print_table(table)


def main(argv: list[str] | None = None) -> None:
    probe = argparse.ArgumentParser(add_help=False)
    add_arguments(probe)
    known, _ = probe.parse_known_args(argv)
    if known.one is not None:
        print(json.dumps(measure_one(known.preset, known.one, known.data_dir)))
        return
    run_alone("memory", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
