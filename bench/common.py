"""What every benchmark shares: the record of what was measured where, tables, and results files.

A result without its machine and code version is not a result (airbench records its source): every JSON
holds the date, the CPU (model, flags that matter, cores, clock), library versions, the git commit and the
load average before and after, since a shared machine's numbers are only as good as its idle time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

import kdq

RESULTS = Path(__file__).resolve().parent / "results"
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """Model, vendor, family/model numbers, SIMD flags, cores and clock from /proc/cpuinfo (Linux x86)."""
    info: dict = {"processor": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    )
    flags = set(first.get("flags", "").split())
    info.update(
        model_name=first.get("model name"),
        vendor=first.get("vendor_id"),
        family=int(first["cpu family"]) if "cpu family" in first else None,
        model=int(first["model"]) if "model" in first else None,
        mhz=float(first["cpu MHz"]) if "cpu MHz" in first else None,
        simd_flags=[f for f in SIMD_FLAGS if f in flags],
        hypervisor="hypervisor" in flags,
    )
    return info


def git_version() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--", "kdq", "bench")),
    }


def environment() -> dict:
    import onnxruntime

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_info(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {
            "kdq": kdq.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "git": git_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
    }


def finish(env: dict) -> dict:
    """Stamp the end of a measurement: the load average tells how shared the machine was."""
    env["load_average_end"] = list(os.getloadavg())
    return env


class Table(NamedTuple):
    """One result table: printed by the benchmark, and rendered into README by `python -m bench.readme`."""

    title: str
    header: list[str]
    rows: list[list]
    note: str | None = None


def print_table(table: Table) -> None:
    cells = [[str(c) for c in table.header]] + [[str(c) for c in r] for r in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    print(f"\n{table.title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    if table.note:
        print(table.note)


def markdown_table(table: Table) -> str:
    """The table as GitHub Markdown: its title in bold, the grid, its note."""
    row = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    lines = [f"**{table.title}**", "", row(table.header), row(["---"] * len(table.header))]
    lines += [row(r) for r in table.rows]
    return "\n".join(lines + (["", table.note] if table.note else []))


def write_results(name: str, results: dict, out_dir: Path = RESULTS) -> Path:
    """bench/results/NAME-<UTC time>.json, and NAME-latest.json beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{stamp}.json"
    text = json.dumps(results, indent=2) + "\n"
    path.write_text(text)
    (out_dir / f"{name}-latest.json").write_text(text)
    return path


def run_alone(
    name: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict],
    show: Callable[[dict], None],
    argv: list[str] | None = None,
) -> None:
    """`python -m bench.NAME`: one part of `make bench` on its own, with its table and its JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    env = environment()
    result = run(args)
    show(result)
    print(f"-> {write_results(name, {'environment': finish(env), **result})}")
