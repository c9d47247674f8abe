"""Run an int8 model on a .npy batch in a process of its own, and save the logits (for `kdq.parity`'s paths).

    python -m kdq.int8run onnx MODEL.onnx X.npy OUT.npy [KEY=VALUE ...]   # KEY=VALUE: ORT session config
    python -m kdq.int8run torch CHECKPOINT X.npy OUT.npy [ENGINE]         # ENGINE: e.g. fbgemm

A process of its own because the int8 path is chosen per process: fbgemm reads its instruction set from the
environment (`kdq.cpu.AVX2_ENV`), and ONNX Runtime reads CPUID, which only an emulator (`kdq.cpu.avx2_emulator`)
can change. The `onnx` mode imports only numpy and onnxruntime, so that it starts in seconds when emulated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from kdq.errors import KdqError

BATCH = 64


class Int8RunError(KdqError):
    """The child process that runs an int8 path failed (its last line of error output says why)."""


def ort_session(model: str | os.PathLike | bytes, threads: int = 1, config: Mapping[str, str] | None = None):
    """An explicit ONNX Runtime CPU session of a file or serialized model: all graph optimizations, `threads`
    intra-op threads, config entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, str(value))
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def logits_in_child(
    mode: str,
    model: str | os.PathLike,
    x,
    extra: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
):
    """Logits of `python -m kdq.int8run MODE MODEL ...` on the array `x`, run under `launcher` (e.g. the AVX2
    emulator) with `env` (e.g. fbgemm's instruction-set override); the arrays pass through a temporary folder."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="kdq-int8run-") as tmp:
        xs, out = Path(tmp) / "x.npy", Path(tmp) / "logits.npy"
        np.save(xs, x)
        cmd = [*launcher, sys.executable, "-m", "kdq.int8run", mode, os.fspath(model), str(xs), str(out), *extra]
        proc = subprocess.run(cmd, env=None if env is None else {**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warning" not in ln.lower()]
            raise Int8RunError(f"{' '.join(cmd[: len(launcher) + 4])}... failed: {(last or ['no output'])[-1]}")
        return np.load(out)


def main(argv: list[str]) -> None:
    import numpy as np

    mode, model, x_path, out, *rest = argv
    x = np.load(x_path)
    if mode == "onnx":
        # every core: under the emulator this is the slow part, and integer kernels give the same logits
        sess = ort_session(model, len(os.sched_getaffinity(0)), dict(e.split("=", 1) for e in rest))
        name = sess.get_inputs()[0].name
        run = lambda b: sess.run(None, {name: b})[0]  # noqa: E731
    elif mode == "torch":
        import torch

        from kdq.checkpoint import load_checkpoint
        from kdq.quant import int8_model

        net = int8_model(load_checkpoint(model), model, engine=rest[0] if rest else None)
        run = lambda b: net(torch.from_numpy(b)).numpy()  # noqa: E731
        torch.set_grad_enabled(False)
    else:
        raise SystemExit(f"unknown mode {mode!r}: onnx or torch")
    np.save(out, np.concatenate([run(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]))


if __name__ == "__main__":
    main(sys.argv[1:])
