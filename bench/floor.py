"""Benchmark 3: a floor for comparison. How fast could the student possibly run on this CPU?

    uv run --frozen python -m bench.floor            # MACs, peaks, and the latest inference results as fractions

The student's multiply-accumulates are counted by torch.utils.flop_counter.FlopCounterMode (convolutions and
the linear layer; 1 MAC = 2 FLOPs; int8 runs the same MACs as fp32). The peak comes from the CPU's own
description (/proc/cpuinfo: vendor, family, SIMD flags, clock) and is stated with its derivation; a GEMM
measured with the same libraries (torch.matmul for fp32, a quantized Linear on the x86 engine for int8) is the
practical ceiling; the larger of the two is the bound (a VM reports its base clock, and a GEMM beating the
theoretical peak proves a boost clock). floor ms = batch x MACs / bound; each latency is shown as floor / ms.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from bench.common import RESULTS, Table, cpu_info, environment, finish, print_table, write_results
from kdq.models import build_model, model_macs


def theoretical_peak(cpu: dict) -> dict:
    """Peak MACs per cycle per core for fp32 and int8, and per second for 1..N cores at the reported clock.

    Per core per cycle: fp32 FMAs = FMA pipes x fp32 lanes of the datapath. Assumed 2 FMA pipes (Intel
    Skylake-SP and later server cores with two AVX-512 units, AMD Zen 2-5). AMD up to family 25 (Zen 2/3/4)
    has 256-bit datapaths: Zen 4 executes a 512-bit instruction as two 256-bit halves, so AVX-512 doubles the
    instruction width, not the FLOPs. int8: a VNNI `vpdpbusd` does 4 u8 x s8 MACs per 32-bit lane at the fp32
    FMA rate (4x fp32); without VNNI the vpmaddubsw/vpmaddwd/vpaddd sequence gives about 2x fp32.
    """
    flags = set(cpu.get("simd_flags", []))
    vector_bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    datapath_bits = vector_bits
    if cpu.get("vendor") == "AuthenticAMD" and (cpu.get("family") or 0) <= 25:
        datapath_bits = min(vector_bits, 256)
    pipes = 2
    fp32_per_cycle = pipes * datapath_bits // 32
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    int8_per_cycle = fp32_per_cycle * (4 if vnni else 2)
    ghz = (cpu.get("mhz") or 0) / 1000
    cores = cpu.get("logical_cpus") or 1
    derivation = (
        f"{cpu.get('model_name')} (vendor {cpu.get('vendor')}, family {cpu.get('family')}, model {cpu.get('model')}), "
        f"{cores} cores at {ghz:.3f} GHz (reported clock; boost, if any, is not visible in this VM). "
        f"{vector_bits}-bit vectors ({'avx512f' if vector_bits == 512 else 'avx2'}), {datapath_bits}-bit datapath x "
        f"{pipes} FMA pipes = {fp32_per_cycle} fp32 MACs/cycle/core; int8 {'VNNI 4x' if vnni else 'no VNNI, 2x'} = "
        f"{int8_per_cycle} MACs/cycle/core. Peak = cores x GHz x MACs/cycle: fp32 {ghz * fp32_per_cycle:.1f} "
        f"GMAC/s per core, int8 {ghz * int8_per_cycle:.1f} GMAC/s per core."
    )
    return {
        "ghz": ghz,
        "cores": cores,
        "fp32_macs_per_cycle_per_core": fp32_per_cycle,
        "int8_macs_per_cycle_per_core": int8_per_cycle,
        "gmacs": {
            p: {t: ghz * per * t for t in range(1, cores + 1)}
            for p, per in (("fp32", fp32_per_cycle), ("int8", int8_per_cycle))
        },
        "derivation": derivation,
    }


def _best_seconds(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_ceiling(threads: int, n: int = 1536, repeats: int = 8) -> dict:
    """Best-of GMAC/s of an n x n x n GEMM: torch.matmul (fp32) and a quantized Linear (int8, x86 engine)."""
    import torch.ao.nn.quantized as nnq

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        fp32 = n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated (pytorch#184982)
            linear = nnq.Linear(n, n)
            w = torch.quantize_per_channel(
                torch.randn(n, n), torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long), 0, torch.qint8
            )
            linear.set_weight_bias(w, None)
            x = torch.quantize_per_tensor(torch.rand(n, n), 1 / 255, 0, torch.quint8)
            int8 = n**3 / _best_seconds(lambda: linear(x), repeats) / 1e9
    finally:
        torch.set_num_threads(previous)
    return {"fp32": fp32, "int8": int8, "n": n}


def effective_peak(peak: dict, ceiling: dict) -> dict:
    """Per precision and thread count: the larger of the theoretical peak and the measured GEMM.

    The reported clock of a VM is its base clock; a GEMM faster than the theoretical peak proves a higher
    (boost) clock, and then the GEMM is the tighter honest bound. `implied_ghz` is what the GEMM needs.
    """
    out: dict = {}
    for p in ("fp32", "int8"):
        per_cycle = peak[f"{p}_macs_per_cycle_per_core"]
        for t, gemm in ceiling.items():
            theory = peak["gmacs"][p][int(t)]
            out.setdefault(p, {})[t] = {
                "theoretical": theory,
                "gemm": gemm[p],
                "used": max(theory, gemm[p]),
                "implied_ghz": gemm[p] / (per_cycle * int(t)),
            }
    return out


def floor_rows(latency: list[dict], macs_per_image: int, bound: dict) -> list[dict]:
    """Each latency row with its floor (batch x MACs / effective peak) and floor / measured."""
    rows = []
    for r in latency:
        macs = r["batch"] * macs_per_image
        gmacs = bound[r["precision"]].get(str(r["threads"]), {}).get("used")
        floor = 1e3 * macs / (gmacs * 1e9) if gmacs else None
        rows.append({**r, "macs": macs, "floor_ms": floor, "fraction_of_floor": floor / r["ms"] if floor else None})
    return rows


def measure(inference: dict | None = None, threads: tuple[int, ...] = (1, 2)) -> dict:
    """MACs, peaks and GEMM ceilings; with inference results, each of their latencies against its floor."""
    cpu = cpu_info()
    arch = (inference or {}).get("arch") or {"name": "mobilenet_v2", "num_classes": 10, "kwargs": {}}
    macs = model_macs(
        build_model(arch["name"], arch["num_classes"], **arch.get("kwargs", {})), arch.get("image_size", 32)
    )
    peak = theoretical_peak(cpu)
    ceiling = {str(t): gemm_ceiling(t) for t in threads if t <= (cpu.get("logical_cpus") or 1)}
    bound = effective_peak(peak, ceiling)
    result = {"model": arch, "macs": macs, "peak": peak, "gemm": ceiling, "bound_gmacs": bound}
    if inference and inference.get("latency"):
        result["rows"] = floor_rows(inference["latency"], macs["macs_per_image"], bound)
    return result


def tables(result: dict) -> list[Table]:
    bound = result["bound_gmacs"]
    out = [
        Table(
            "Peak GMAC/s: theoretical at the reported clock, measured GEMM (best of 8, 1536^3), and the bound used",
            ["precision", "threads", "theoretical", "GEMM", "GEMM implies GHz", "bound"],
            [
                [prec, t, f"{b['theoretical']:.1f}", f"{b['gemm']:.1f}", f"{b['implied_ghz']:.2f}", f"{b['used']:.1f}"]
                for prec, by_threads in bound.items()
                for t, b in by_threads.items()
            ],
        )
    ]
    if result.get("rows"):
        out.append(
            Table(
                "Latency against the floor (floor = batch x MACs / bound; 100% = running at the bound)",
                ["runtime", "precision", "batch", "threads", "ms", "floor ms", "floor / ms"],
                [
                    [
                        r["runtime"],
                        r["precision"],
                        r["batch"],
                        r["threads"],
                        f"{r['ms']:.3f}",
                        f"{r['floor_ms']:.3f}",
                        f"{r['fraction_of_floor']:.1%}",
                    ]
                    for r in result["rows"]
                ],  # fmt: skip
            )
        )
    return out


def summary(result: dict) -> str:
    m, arch = result["macs"], result["model"]
    return (
        f"Floor: {arch['name']} {arch.get('kwargs') or ''}: {m['macs_per_image'] / 1e6:.2f} M MACs per image "
        f"({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in m['per_op'].items())}). "
        f"Peak derivation: {result['peak']['derivation']}"
    )


def show(result: dict) -> None:
    print(f"\n{summary(result)}")
    for table in tables(result):
        print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--latency",
        default=str(RESULTS / "inference-latest.json"),
        help="inference results whose latencies to express as fractions (if the file exists)",
    )
    args = parser.parse_args(argv)
    env = environment()
    try:
        with open(args.latency) as f:
            inference = json.load(f)
    except (OSError, ValueError):
        inference = None
    result = measure(inference)
    show(result)
    print(f"-> {write_results('floor', {'environment': finish(env), 'floor': result})}")


if __name__ == "__main__":
    main()
