"""int8 on every x86 CPU: each int8 scheme's accuracy on the VNNI path and on the AVX2 (int16-saturating) path.

    uv run --frozen python -m bench.int8_paths --run-dir runs/demo      # after `make demo`

From RUN's float KD student (with RUN's soft targets and the preset's QAT recipe) it makes one QAT and one
PTQ model per scheme: 8-bit activations and weights (full range), 7-bit activations, 7-bit weights. Each
is measured on the whole test split, on every path this machine can take (`kdq.cpu`):
- PyTorch int8 on this CPU's own path, and with fbgemm forced to AVX2 (what an AVX2-only CPU computes);
- ONNX Runtime on this CPU with and without `session.x64quantprecision=1` (exact kernels), and under qemu's
  AVX2-only CPU model (MLAS's AVX2 kernels, emulated);
- ORT int8 vs fp32 latency, batch 1 and 64, 1 thread, on this CPU (interleaved rounds, median of rounds).
Prints the table and writes bench/results/int8_paths-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import Table, print_table, run_alone
from kdq import checkpoint as ck
from kdq.config import Preset, with_overrides
from kdq.cpu import AVX2_ENV, ORT_EXACT_U8S8, environment, has_vnni, ort_avx2_launcher
from kdq.data import Normalize, load_dataset
from kdq.evaluate import median_ms
from kdq.export import export_onnx, export_torchscript
from kdq.int8run import logits_in_child
from kdq.int8run import ort_session as session
from kdq.parity import batched, ort_runner
from kdq.quant import Scheme, float_reference, int8_model
from kdq.recipes import SOFT_TARGETS, RunOptions, quantize_static, train_student
from kdq.train import CHECKPOINT

SCHEMES = {"a8w8": Scheme(8, 8), "a7w8": Scheme(7, 8), "a8w7": Scheme(8, 7)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="a finished `kdq pipeline` run")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--modes", nargs="+", choices=["qat", "ptq"], default=["qat", "ptq"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")


def run(args: argparse.Namespace) -> dict:
    student = args.run_dir / "student" / "checkpoint.pt"
    fckpt = ck.load_checkpoint(student)
    preset = Preset.from_dict(fckpt[ck.PRESET])
    data = load_dataset(preset.dataset, args.data_dir, image_size=preset.image_size)
    x = Normalize(**fckpt[ck.NORMALIZATION])(data.test.images).contiguous().numpy()
    labels = data.test.labels.numpy()
    avx2_launcher, why = ort_avx2_launcher()  # this CPU's own kernels, or the emulator once its canary passed
    if avx2_launcher is None:
        print(f"ONNX Runtime's AVX2 path is not measured: {why}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdq-int8-paths-") as tmp:
        tmp = Path(tmp)
        (tmp / SOFT_TARGETS).symlink_to((args.run_dir / SOFT_TARGETS).resolve())
        fp32_onnx = tmp / "fp32.onnx"
        export_onnx(ck.model_from_checkpoint(fckpt), fp32_onnx, 17, preset.image_size)
        acc = lambda logits: float((logits.argmax(1) == labels).mean())  # noqa: E731
        float_acc = acc(ort_logits(fp32_onnx, x))
        for name in args.schemes:
            scheme = SCHEMES[name]
            for mode in args.modes:
                path = quantized(student, preset, scheme, mode, tmp, args.data_dir, f"{mode}-{name}")
                ckpt = ck.load_checkpoint(path)
                onnx = tmp / f"{mode}-{name}.onnx"
                model = int8_model(ckpt, path)
                export_onnx(model, onnx, 17, preset.image_size)
                export_torchscript(model, tmp / f"{mode}-{name}.pt")
                with torch.no_grad():
                    native = model(torch.from_numpy(x)).numpy()
                row = {"scheme": name, "mode": mode, **scheme.__dict__, "fp32": float_acc}
                row["pytorch_native"] = acc(native)
                row["pytorch_avx2"] = acc(logits_in_child("torch", path, x, ["fbgemm"], env=AVX2_ENV))
                row["ort_native"] = acc(ort_logits(onnx, x))
                row["ort_native_exact"] = acc(ort_logits(onnx, x, ORT_EXACT_U8S8))
                if avx2_launcher is not None:
                    row["ort_avx2"] = acc(logits_in_child("onnx", onnx, x, launcher=avx2_launcher))
                row["float_reference"] = acc(float_reference(ckpt)(torch.from_numpy(x)).detach().numpy())
                row["latency_ms"] = ort_latency(onnx, fp32_onnx, args.rounds, preset.image_size)
                rows.append(row)
                print(row, file=sys.stderr)
    return {"vnni": has_vnni(), "where": environment(), "test_samples": len(labels), "rows": rows}


def quantized(student: Path, preset: Preset, scheme: Scheme, mode: str, tmp: Path, data_dir: Path, stage: str):
    opts = RunOptions(data_dir=data_dir, device="cpu")
    if mode == "ptq":
        return quantize_static(student, tmp / f"{stage}.ckpt", opts, batches=preset.quant.calibration_batches,
                               scheme=scheme)  # fmt: skip
    quant = with_overrides(preset.quant, activation_bits=scheme.activation_bits, weight_bits=scheme.weight_bits)
    teacher = student.parent.parent / "teacher" / CHECKPOINT  # RUN's teacher: the soft targets are its logits
    return train_student(with_overrides(preset, quant=quant), tmp, opts, stage=stage, qat=True, init=student,
                         teacher_path=teacher)  # fmt: skip


def ort_logits(onnx: Path, x: np.ndarray, config: dict | None = None) -> np.ndarray:
    return batched(ort_runner(session(str(onnx), 1, config)), x)


def ort_latency(int8: Path, fp32: Path, rounds: int, image_size: int = 32) -> dict:
    """ORT int8 and fp32, 1 thread, batch 1 and 64: A B A B ... rounds; the median of the rounds' medians."""
    out = {}
    sessions = {"int8": session(str(int8)), "int8_exact": session(str(int8), 1, ORT_EXACT_U8S8),
                "fp32": session(str(fp32))}  # fmt: skip
    for batch in (1, 64):
        xb = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
        per_round: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, s in sessions.items():
                step = lambda s=s, xb=xb: s.run(None, {"input": xb})  # noqa: E731
                per_round[k].append(median_ms(step, 3, 30 if batch == 1 else 5))
        for k, v in per_round.items():
            out[f"{k}_b{batch}"] = float(np.median(v))
    return out


def tables(result: dict) -> list[Table]:
    cols = ["fp32", "pytorch_native", "pytorch_avx2", "ort_native", "ort_native_exact", "ort_avx2"]
    ms = lambda r, k: f"{r['latency_ms'][f'int8_{k}']:.3f}/{r['latency_ms'][f'fp32_{k}']:.3f}"  # noqa: E731
    rows = [[f"{r['mode']} {r['scheme']}", *(f"{r[c]:.2%}" if c in r else "-" for c in cols), ms(r, "b1"), ms(r, "b64")]
            for r in result["rows"]]  # fmt: skip
    where = result["where"]
    table = Table(
        f"int8 accuracy by path ({result['test_samples']} test images; this CPU: {where['cpu_model']}, "
        f"{'VNNI' if result['vnni'] else 'no VNNI'})",
        ["model", *cols, "ORT ms b1 int8/fp32", "ORT ms b64 int8/fp32"],
        rows,
        "native = this CPU's own kernels; avx2 = forced (fbgemm) or emulated (ORT under qemu); "
        "exact = session.x64quantprecision=1. Latency: 1 thread, median of interleaved rounds.",
    )
    return [table]


def show(result: dict) -> None:
    print_table(tables(result)[0])


def main(argv: list[str] | None = None) -> None:
    run_alone("int8_paths", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
