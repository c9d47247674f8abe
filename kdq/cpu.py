"""Which int8 code path this CPU takes, how to take the other one on purpose, and how to run as another CPU.

x86 int8 kernels come in two kinds. With VNNI, `vpdpbusd` accumulates u8 x s8 products in int32 and cannot
overflow. Without it (AVX2, and AVX-512 without VNNI) `vpmaddubsw` adds *pairs* of u8 x s8 products into a
saturating int16: 8-bit activations (0..255) times 8-bit weights (-128..127) can reach 2 * 255 * 128 = 65,280,
far beyond 32,767, and the model silently changes. Most x86 edge devices are of the second kind, so kdq
certifies both. The two libraries do not read the same CPU flags:

- PyTorch's x86 engine (fbgemm) has VNNI kernels for AVX-512 only (its `AVX512_E1` level: `avx512_vnni`);
  on a CPU with AVX-VNNI alone (the VEX-encoded form of Alder Lake and later client chips) it saturates.
  It takes its instruction set from `FBGEMM_ENABLE_INSTRUCTIONS`, read at the first int8 GEMM:
  `AVX2_ENV` forces the saturating kernels on any machine, at native speed.
- ONNX Runtime (MLAS) has kernels for both `avx512_vnni` and `avx_vnni`. It reads CPUID and has no override,
  so its AVX2 path runs under `qemu-x86_64` with a CPU model that has AVX2 but no AVX-512 or VNNI (Debian's
  qemu-user: the real MLAS kernels, emulated; accuracy only, timings are meaningless there).
  `session.x64quantprecision = 1` switches CPUs without VNNI to exact (u8 x u8, int16-widened) kernels.

`KDQ_CPU=avx2` makes kdq run as an AVX2-only CPU on any x86 CPU: `has_vnni()` is false, fbgemm is forced to
AVX2 (this module sets its variable when kdq is imported, so child processes inherit it), and the certificate
computes every ONNX Runtime int8 accuracy under the emulator. The reverse cannot be emulated: qemu-user has
no AVX-512, so `KDQ_CPU=vnni` on a CPU without VNNI is refused. Latency is always this CPU's own.

An emulator that silently lacked AVX2 (an old qemu) would run MLAS's SSE kernels, which do not saturate, and
"certify" the AVX2 path without running it: `avx2_canary` proves, once per process, that the emulator takes
the saturating kernels.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from kdq.errors import KdqError

IDENTITY_ENV = "KDQ_CPU"  # native (default) | avx2 | vnni: which x86 int8 CPU kdq behaves as
IDENTITIES = ("native", "avx2", "vnni")
FBGEMM_ISA_ENV = "FBGEMM_ENABLE_INSTRUCTIONS"
AVX2_ENV = {FBGEMM_ISA_ENV: "AVX2"}
QEMU = "qemu-x86_64"
QEMU_AVX2_CPU = "Haswell-v4"  # AVX2 + FMA, no AVX-512, no VNNI: the int16-saturating kernels
ORT_EXACT_U8S8 = {"session.x64quantprecision": "1"}  # ORT: non-saturating kernels on CPUs without VNNI
# The CPU flags with which each library accumulates u8 x s8 in int32 (see the module docstring).
VNNI_FLAGS = {"pytorch": ("avx512_vnni",), "onnxruntime": ("avx512_vnni", "avx_vnni")}
RUNTIMES = tuple(VNNI_FLAGS)


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


def identity() -> str:
    """The CPU kind kdq behaves as (`KDQ_CPU`): native, avx2 or vnni; a value it cannot honour is a KdqError."""
    value = os.environ.get(IDENTITY_ENV, "native").strip().lower() or "native"
    if value not in IDENTITIES:
        raise KdqError(f"{IDENTITY_ENV}={value!r}: choose from {', '.join(IDENTITIES)}")
    if value == "vnni" and set(native_isa().values()) != {"vnni"}:
        raise KdqError(
            f"{IDENTITY_ENV}=vnni on a CPU without AVX-512 VNNI ({cpu_model()}): VNNI cannot be emulated (qemu-user "
            "has no AVX-512); this CPU's own run is the AVX2 one"
        )
    return value


def native_isa(flags: set[str] | None = None) -> dict[str, str]:
    """The int8 path each runtime's kernels take on this CPU, ignoring `KDQ_CPU`: {runtime: "vnni" | "avx2"}."""
    flags = cpu_flags() if flags is None else flags
    return {rt: "vnni" if set(names) & flags else "avx2" for rt, names in VNNI_FLAGS.items()}


def int8_isa(flags: set[str] | None = None) -> dict[str, str]:
    """The int8 path each runtime takes for kdq: the native one, or "avx2" for both under `KDQ_CPU=avx2`."""
    if identity() == "avx2":
        return dict.fromkeys(RUNTIMES, "avx2")
    return native_isa(flags)


def has_vnni(flags: set[str] | None = None) -> bool:
    """Both runtimes accumulate in int32 (AVX-512 VNNI): the saturating AVX2 path is not this CPU's own."""
    return set(int8_isa(flags).values()) == {"vnni"}


def quantized_engine(backend: str) -> str:
    """The PyTorch quantized engine that runs a `backend` int8 model as kdq's CPU identity computes it. Under
    `KDQ_CPU=avx2`, x86 models run on fbgemm: where the x86 engine sends every convolution on a CPU without
    VNNI (with VNNI it sends most of them to oneDNN, which `FBGEMM_ENABLE_INSTRUCTIONS` does not reach)."""
    return "fbgemm" if backend == "x86" and identity() == "avx2" else backend


def apply_identity() -> None:
    """Under `KDQ_CPU=avx2`, force fbgemm's AVX2 kernels in this process and its children (before any int8 op)."""
    if os.environ.get(IDENTITY_ENV, "").strip().lower() == "avx2":
        os.environ.update(AVX2_ENV)


def avx2_emulator() -> list[str] | None:
    """The command prefix that runs a program on an emulated AVX2-only CPU, or None without qemu-user."""
    qemu = shutil.which(QEMU)
    return [qemu, "-cpu", QEMU_AVX2_CPU] if qemu else None


def canary_model() -> bytes:
    """A one-convolution ONNX model on which the saturating kernels and exact arithmetic disagree.

    Input 255 everywhere (u8, zero point 0), weights -128, -128, 127, 127 repeated over 64 input channels
    (s8, scale 1/128): exact pair sums are -65,280 and +64,770 (-8,160 over the channels, output 64 at scale 1
    and zero point 128), saturated ones -32,768 and +32,767 (-16 over the channels, output 128)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.tile(np.array([-128, -128, 127, 127], np.int8), 16).reshape(1, 64, 1, 1).repeat(8, 0)
    consts = {"xs": np.float32(1.0), "xz": np.uint8(0), "w": w, "ws": np.full(8, 1 / 128, np.float32),
              "wz": np.zeros(8, np.int8), "ys": np.float32(1.0), "yz": np.uint8(128)}  # fmt: skip
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "kdq-avx2-canary", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 64, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8, 2, 2])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


CANARY_EXACT, CANARY_SATURATED = 64, 128


def canary_outputs() -> dict[str, int]:
    """The canary's output on the CPU this runs on: {"default": ..., "exact": ...} (ORT default and u8u8)."""
    import numpy as np

    from kdq.int8run import ort_session

    x = {"x": np.full((1, 64, 2, 2), 255, np.uint8)}
    model = canary_model()
    return {name: int(ort_session(model, 1, config).run(None, x)[0].ravel()[0])
            for name, config in (("default", {}), ("exact", ORT_EXACT_U8S8))}  # fmt: skip


@functools.lru_cache(maxsize=4)
def avx2_canary(launcher: tuple[str, ...]) -> str | None:
    """None when `launcher` really runs ONNX Runtime's saturating AVX2 kernels (and its exact ones stay exact);
    else why not, in one line. Cached per process: the emulated run takes seconds."""
    cmd = [*launcher, sys.executable, "-c", "from kdq.cpu import canary_outputs; print(canary_outputs())"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the AVX2 canary did not run under `{' '.join(launcher)}`: {last}"
    seen = proc.stdout.strip().splitlines()[-1]
    if seen != str({"default": CANARY_SATURATED, "exact": CANARY_EXACT}):
        return (
            f"`{' '.join(Path(c).name for c in launcher)}` does not run ONNX Runtime's int16-saturating AVX2 kernels "
            f"(canary gave {seen}; expected default {CANARY_SATURATED}, exact {CANARY_EXACT}): no AVX2 there?"
        )
    return None


def ort_avx2_launcher() -> tuple[list[str] | None, str | None]:
    """How to run ONNX Runtime's AVX2 kernels here: `[]` (a plain child process) where they are this CPU's own,
    else the emulator once its canary has passed; `(None, why)` where neither is possible."""
    if native_isa()["onnxruntime"] == "avx2":
        return [], None
    emulator = avx2_emulator()
    if emulator is None:
        return None, "qemu-x86_64 not found: install Debian's qemu-user to certify ONNX Runtime's AVX2 path"
    reason = avx2_canary(tuple(emulator))
    return (None, reason) if reason else (emulator, None)


def fbgemm_saturates() -> bool:
    """The canary's convolution through PyTorch's x86 engine in *this* process: True where fbgemm runs its
    saturating AVX2 kernels (`FBGEMM_ENABLE_INSTRUCTIONS` is read once, at the first int8 op of a process)."""
    import torch

    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        conv = torch.ao.nn.quantized.Conv2d(64, 8, 1)
        w = torch.tensor([-1.0, -1.0, 127 / 128, 127 / 128]).repeat(16).view(1, 64, 1, 1).repeat(8, 1, 1, 1)
        zeros = torch.zeros(8, dtype=torch.long)
        conv.set_weight_bias(torch.quantize_per_channel(w, torch.full((8,), 1 / 128), zeros, 0, torch.qint8), None)
        conv.scale, conv.zero_point = 1.0, 128
        x = torch.quantize_per_tensor(torch.full((1, 64, 2, 2), 255.0), 1.0, 0, torch.quint8)
        out = int(conv(x).int_repr().flatten()[0])
    finally:
        torch.backends.quantized.engine = engine
    return out == CANARY_SATURATED


def describe_isa(isa: dict[str, str]) -> str:
    """'VNNI', 'AVX2 (no VNNI)', or each runtime's where they differ (AVX-VNNI CPUs)."""
    words = {"vnni": "VNNI", "avx2": "AVX2 (no VNNI)"}
    if len(set(isa.values())) == 1:
        return words[next(iter(isa.values()))]
    return ", ".join(f"{rt}: {words[v]}" for rt, v in isa.items())


def int8_paths(flags: set[str] | None = None) -> dict[str, str]:
    """The int8 GEMM path each runtime takes in *this* process, in words."""
    isa, native = int8_isa(flags), native_isa(flags)
    words = {"vnni": "VNNI (int32 accumulation)", "avx2": "AVX2 u8s8 (int16 pair saturation)"}
    forced = os.environ.get(FBGEMM_ISA_ENV)
    fbgemm = f"forced {forced} via {FBGEMM_ISA_ENV}" if forced else words[native["pytorch"]]
    mlas = words[isa["onnxruntime"]]
    if isa["onnxruntime"] != native["onnxruntime"]:
        mlas += f" under `{QEMU} -cpu {QEMU_AVX2_CPU}` ({IDENTITY_ENV}={identity()}; latency: this CPU's own)"
    return {"pytorch_fbgemm": fbgemm, "onnxruntime_mlas": mlas}


def environment(threads: dict[str, int] | None = None) -> dict:
    """Where a measurement was made: CPU, ISA as each library sees it, threads, library versions."""
    import onnxruntime
    import torch

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "identity": identity(),
        "vnni": has_vnni(flags),
        "native_isa": native_isa(flags),
        "int8_isa": int8_isa(flags),
        "simd_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}),
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
    if env.get("identity", "native") != "native":
        isa += f" as {IDENTITY_ENV}={env['identity']}"
    versions = f"torch {env['versions']['torch']}, ORT {env['versions']['onnxruntime']}"
    return f"{env['cpu_model']} ({isa}; {env['cpu_count']} CPUs; {versions})"
