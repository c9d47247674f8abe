"""Benchmark 2: inference latency of the student, fp32 and int8, in PyTorch, TorchScript and ONNX Runtime.

    uv run --frozen python -m bench.inference                       # an untrained student (latency ignores weights)
    uv run --frozen python -m bench.inference --checkpoint runs/demo/student_qat/checkpoint.pt

The int8 artifacts are made by kdq itself: `kdq.recipes.quantize_static` (x86, calibrated on the digits data
that ships with scikit-learn, so no download) and `kdq.export.export` (TorchScript + ONNX, as `kdq export`
writes them); the fp32 ones by the same export functions, as the parity certificate does. Latency is
`kdq.parity`'s grid (median of many runs after warm-up, one ORT session per thread count), repeated in
interleaved rounds; the best median per cell is kept because a shared machine only ever adds time. Ratios
(int8 vs fp32, ONNX Runtime vs PyTorch) divide cells of the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Table, print_table, run_alone
from kdq import checkpoint as ck
from kdq.artifacts import ARTIFACTS, load_target
from kdq.data import load_dataset
from kdq.evaluate import state_dict_bytes
from kdq.export import export, export_onnx, export_torchscript
from kdq.models import build_model
from kdq.parity import _latency_grid, _speedups, ort_runner, ort_session, torch_runner
from kdq.presets import get_preset
from kdq.quant import float_reference, int8_model
from kdq.recipes import RunOptions, quantize_static

RUNTIMES = ("pytorch", "torchscript", "onnxruntime")


def untrained_int8_student(work: Path, calibration_batches: int = 8) -> Path:
    """A fresh MobileNetV2 student (mobilenet_v2, width 1.0, 10 classes; results/bench.json measured this one),
    x86 PTQ by kdq, calibrated on the fashion-mnist-cpu preset's data (shipped in kdq, so no download)."""
    preset = get_preset("fashion-mnist-cpu")
    data = load_dataset(preset.dataset)
    torch.manual_seed(0)
    kwargs = {"width_mult": 1.0, "dropout": preset.student_dropout}
    model = build_model("mobilenet_v2", len(data.classes), **kwargs)
    mean, std = data.normalization()
    float_ckpt = {
        ck.ARCH: {"name": "mobilenet_v2", "num_classes": len(data.classes), "kwargs": kwargs},
        ck.MODEL: model.state_dict(),
        ck.NORMALIZATION: {"mean": mean, "std": std},
        ck.CLASSES: data.classes,
        ck.STAGE: "student",
        ck.PRESET: preset.to_dict(),
    }
    ck.save_checkpoint(float_ckpt, work / "float.pt")
    return quantize_static(work / "float.pt", work / "int8.pt", RunOptions(), batches=calibration_batches)


def build_artifacts(work: Path, checkpoint: Path | None) -> tuple[dict, dict, dict]:
    """Export int8 (kdq.export) and fp32 artifacts; return the runners, the sizes in bytes and the architecture."""
    checkpoint = checkpoint or untrained_int8_student(work)
    target = load_target("x86")
    export(checkpoint, work / "int8", target, verify=False)
    ckpt = ck.load_checkpoint(checkpoint)
    int8, fp32 = int8_model(ckpt, checkpoint), float_reference(ckpt)
    if fp32 is None:
        raise SystemExit(f"{checkpoint} records no float weights (FLOAT_MODEL): cannot compare int8 with fp32")
    (work / "fp32").mkdir()
    export_torchscript(fp32, work / "fp32" / ARTIFACTS["torchscript"])
    export_onnx(fp32, work / "fp32" / ARTIFACTS["onnx"], target.onnx_opset, ck.input_size(ckpt))
    torch.backends.quantized.engine = target.backend
    runners = {}
    sizes = {}
    for precision, model in (("fp32", fp32), ("int8", int8)):
        folder = work / precision
        runners[("pytorch", precision)] = torch_runner(model)
        runners[("torchscript", precision)] = torch_runner(torch.jit.load(str(folder / ARTIFACTS["torchscript"])))
        runners[("onnxruntime", precision)] = ort_runner(ort_session(folder / ARTIFACTS["onnx"], 1))
        sizes[precision] = {
            "state_dict": state_dict_bytes(model),
            **{fmt: (folder / ARTIFACTS[fmt]).stat().st_size for fmt in target.formats},  # the files an x86 export has
        }
    return runners, sizes, {**ckpt[ck.ARCH], "image_size": ck.input_size(ckpt)}


def measure(checkpoint: Path | None, rounds: int, runs: int, warmup: int, threads: list[int], batches: list[int]):
    grid = {"batch_sizes": batches, "threads": threads, "warmup": warmup, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="kdq-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        runners, sizes, arch = build_artifacts(work, checkpoint)
        print(f"[inference] artifacts built in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        every = []
        for r in range(rounds):
            t0 = time.perf_counter()
            every.append(_latency_grid(runners, work / "int8", work / "fp32", grid, image_size=arch["image_size"]))
            print(f"[inference] round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    best = []
    for cells in zip(*every, strict=True):
        best.append({**cells[0], "ms": min(c["ms"] for c in cells), "rounds_ms": [c["ms"] for c in cells]})
    ms = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["ms"] for r in best}
    ort_vs = {
        f"{other}_{p}_b{b}_t{t}": ms[(other, p, b, t)] / ms[("onnxruntime", p, b, t)]
        for (rt, p, b, t) in ms
        if rt == "onnxruntime"
        for other in ("pytorch", "torchscript")
        if (other, p, b, t) in ms
    }
    return {
        "model": str(checkpoint) if checkpoint else "untrained mobilenet_v2 student (width 1.0), x86 PTQ",
        "arch": arch,
        "grid": {
            **grid,
            "rounds": rounds,
            "batch_64_runs": max(3, runs // 5),
            "statistic": "best of rounds of medians",
        },
        "latency": best,
        "speedup_int8_vs_fp32": _speedups(best),
        "ort_speedup_vs": ort_vs,
        "sizes_bytes": sizes,
    }


def tables(result: dict) -> list[Table]:
    rows = result["latency"]
    cells = list(dict.fromkeys((r["batch"], r["threads"]) for r in rows))
    ms = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["ms"] for r in rows}
    header = ["runtime", "precision"] + [f"b{b} {t}t ms" for b, t in cells]
    table = [
        [rt, p] + [f"{ms[(rt, p, b, t)]:.3f}" for b, t in cells]
        for p in ("fp32", "int8")
        for rt in RUNTIMES
        if (rt, p, *cells[0]) in ms
    ]
    g = result["grid"]
    latency = Table(
        f"Inference latency (ms, best of {g['rounds']} rounds of medians; {g['runs']} runs at batch 1, "
        f"{g['batch_64_runs']} at batch 64)",
        header,
        table,
    )
    speed = result["speedup_int8_vs_fp32"]
    speedup = Table(
        "int8 vs fp32 speedup (fp32 ms / int8 ms, same runtime, same run)",
        ["runtime"] + [f"b{b} {t}t" for b, t in cells],
        [[rt] + [f"{speed[f'{rt}_b{b}_t{t}']:.2f}x" for b, t in cells] for rt in RUNTIMES],
    )
    ort = result["ort_speedup_vs"]
    ort_vs = Table(
        "ONNX Runtime vs PyTorch / TorchScript (their ms / ORT ms, same run; > 1: ORT faster)",
        ["vs", "precision"] + [f"b{b} {t}t" for b, t in cells],
        [
            [other, p] + [f"{ort[f'{other}_{p}_b{b}_t{t}']:.2f}x" for b, t in cells]
            for other in ("pytorch", "torchscript")
            for p in ("fp32", "int8")
        ],
    )
    sizes = result["sizes_bytes"]
    size = Table(
        "Model size (MB)",
        ["precision", "state_dict", "TorchScript", "ONNX"],
        [[p, *(f"{s[k] / 1e6:.2f}" for k in ("state_dict", "torchscript", "onnx"))] for p, s in sizes.items()],
    )
    return [latency, speedup, ort_vs, size]


def show(result: dict) -> None:
    for table in tables(result):
        print_table(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None, help="a quantized kdq checkpoint (default: untrained)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of the whole grid")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per cell at batch 1 (batch 64: runs / 5)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])


def run(args: argparse.Namespace) -> dict:
    return measure(args.checkpoint, args.rounds, args.runs, args.warmup, args.threads, args.batches)


def main(argv: list[str] | None = None) -> None:
    run_alone("inference", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
