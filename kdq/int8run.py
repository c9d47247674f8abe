"""Run an int8 model on a .npy batch in a process of its own, and save the logits (for `kdq.parity`'s paths).

    python -m kdq.int8run onnx MODEL.onnx X.npy OUT.npy [KEY=VALUE ...]   # KEY=VALUE: ORT session config
    python -m kdq.int8run torch CHECKPOINT X.npy OUT.npy [ENGINE]         # ENGINE: e.g. fbgemm

A process of its own because the int8 path is chosen per process: fbgemm reads its instruction set from the
environment (`kdq.cpu.AVX2_ENV`), and ONNX Runtime reads CPUID, which only an emulator (`kdq.cpu.avx2_emulator`)
can change. The `onnx` mode imports only numpy and onnxruntime, so that it starts in seconds when emulated.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

BATCH = 64


def ort_session(path: str | os.PathLike, threads: int = 1, config: Mapping[str, str] | None = None):
    """An explicit ONNX Runtime CPU session: all graph optimizations, `threads` intra-op threads, config entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, str(value))
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str]) -> None:
    import numpy as np

    mode, model, x_path, out, *rest = argv
    x = np.load(x_path)
    if mode == "onnx":
        sess = ort_session(model, 1, dict(e.split("=", 1) for e in rest))
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
