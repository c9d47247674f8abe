"""Which int8 code path this CPU takes, and how to take the other one on purpose.

x86 int8 kernels come in two kinds. With VNNI (AVX-512 VNNI, AVX-VNNI: Ice Lake, Zen 4 and later)
`vpdpbusd` accumulates u8 x s8 products in int32 and cannot overflow. Without it (AVX2, and AVX-512
without VNNI) `vpmaddubsw` adds *pairs* of u8 x s8 products into a saturating int16: 8-bit activations
(0..255) times 8-bit weights (-128..127) can reach 2 * 255 * 128 = 65,280, far beyond 32,767, and the
model silently changes. Most x86 edge devices are of the second kind, so kdq certifies both:

- PyTorch (fbgemm) takes its instruction set from `FBGEMM_ENABLE_INSTRUCTIONS` (AVX2, AVX512, AVX512_E1 =
  VNNI): `AVX2_ENV` forces the saturating kernels on any machine, at native speed.
- ONNX Runtime (MLAS) reads CPUID and has no override, so the AVX2 path runs ORT under `qemu-x86_64` with a
  CPU model that has AVX2 but no AVX-512 or VNNI (Debian's qemu-user: the real MLAS kernels, emulated;
  accuracy only, timings are meaningless there). On a CPU without VNNI ORT already takes the AVX2 path.
  ORT's `session.x64quantprecision = 1` switches such CPUs to exact (u8 x u8, int16-widened) kernels.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

FBGEMM_ISA_ENV = "FBGEMM_ENABLE_INSTRUCTIONS"
AVX2_ENV = {FBGEMM_ISA_ENV: "AVX2"}
QEMU = "qemu-x86_64"
QEMU_AVX2_CPU = "Haswell-v4"  # AVX2 + FMA, no AVX-512, no VNNI: the int16-saturating kernels
ORT_EXACT_U8S8 = {"session.x64quantprecision": "1"}  # ORT: non-saturating kernels on CPUs without VNNI
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags() -> set[str]:
    """The kernel's CPU flags (Linux /proc/cpuinfo); empty where unavailable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_vnni(flags: set[str] | None = None) -> bool:
    return bool(set(VNNI_FLAGS) & (cpu_flags() if flags is None else flags))


def avx2_emulator() -> list[str] | None:
    """The command prefix that runs a program on an emulated AVX2-only CPU, or None without qemu-user."""
    qemu = shutil.which(QEMU)
    return [qemu, "-cpu", QEMU_AVX2_CPU] if qemu else None


def int8_paths(flags: set[str] | None = None) -> dict[str, str]:
    """The int8 GEMM path each runtime takes in *this* process, in words."""
    vnni = has_vnni(flags)
    forced = os.environ.get(FBGEMM_ISA_ENV)
    native = "VNNI (int32 accumulation)" if vnni else "AVX2 u8s8 (int16 pair saturation)"
    fbgemm = f"forced {forced} via {FBGEMM_ISA_ENV}" if forced else native
    return {"pytorch_fbgemm": fbgemm, "onnxruntime_mlas": native}


def environment(threads: dict[str, int] | None = None) -> dict:
    """Where a measurement was made: CPU, ISA as each library sees it, threads, library versions."""
    import onnxruntime
    import torch

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "vnni": has_vnni(flags),
        "simd_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", *VNNI_FLAGS, "amx_int8"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_vnni": bool(torch.cpu._is_vnni_supported()),
        "int8_paths": int8_paths(flags),
        "threads": threads or {"torch": torch.get_num_threads()},
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }


def describe(env: dict) -> str:
    """One line for logs and reports."""
    isa = f"{env['torch_cpu_capability']}, {'VNNI' if env['vnni'] else 'no VNNI'}"
    versions = f"torch {env['versions']['torch']}, ORT {env['versions']['onnxruntime']}"
    return f"{env['cpu_model']} ({isa}; {env['cpu_count']} CPUs; {versions})"
