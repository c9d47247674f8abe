"""Artifacts of a PT2E int8 model (`kdq.pt2e`): ONNX through the dynamo exporter, a `torch.export` program
(`.pt2`: TorchScript cannot follow a Q/DQ graph), and an ExecuTorch program lowered to XNNPACK (`.pte`).

Each takes the converted Q/DQ GraphModule and re-exports it with a dynamic batch. ExecuTorch plans its memory
for an upper bound of the batch (`PTE_MAX_BATCH`): bigger batches are split by the runner (`pte_runner`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kdq.artifacts import INPUT_NAME, OUTPUT_NAME, ExportError, sha256
from kdq.errors import KdqError
from kdq.files import atomic_output
from kdq.pt2e import EXAMPLE_BATCH, dynamic_batch, example_input, inference_only

PTE_MAX_BATCH = 64  # the largest batch a .pte accepts (the latency grid's largest)
# Edge-dialect operators that must run inside the XNNPACK delegate for the model to be int8 end to end.
INT8_OPS = ("convolution", "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel",
            "dequantize_per_channel", "add")  # fmt: skip


def _export_program(
    model: torch.nn.Module, image_size: int, max_batch: int | None = None
) -> torch.export.ExportedProgram:
    """With `max_batch`, the example has that batch: ExecuTorch sizes its planned input from the example, not
    from the Dim's bound (an example batch of 2 gave a .pte that refused batches over 15)."""
    x = example_input(image_size, batch=max_batch or EXAMPLE_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), dynamic_shapes=dynamic_batch(max_batch))


def export_onnx_dynamo(model: torch.nn.Module, path: Path, opset: int, image_size: int = 32) -> None:
    """torch.onnx.export(dynamo=True): Q/DQ pairs (per-channel weights need onnxscript >= 0.7.1) that ONNX
    Runtime fuses into QLinearConv / QLinearAdd; one file (no external data)."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _export_program(model, image_size), (example_input(image_size),), str(path), dynamo=True,
            opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
            verbose=False,
        )  # fmt: skip
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported {path.name} is not valid ONNX ({str(e).strip().splitlines()[0][:200]})") from e


def export_pt2(model: torch.nn.Module, path: Path, image_size: int = 32) -> None:
    """torch.export.save: the Q/DQ program with its int8 weights, loadable with `load_pt2`."""
    torch.export.save(_export_program(model, image_size), str(path))


def converted_cache(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.int8.pt2")


def cached_int8(checkpoint: Path, convert: Callable[[], torch.nn.Module], image_size: int = 32) -> torch.nn.Module:
    """The converted model of a PT2E checkpoint, kept beside it as CHECKPOINT.int8.pt2.

    Why: converting a QAT checkpoint re-runs torchao's prepare and conv-bn folding, about a minute for
    MobileNetV2 on 2 cores, and evaluation, export and the certificate each need the model. The cache is
    used only when it records the checkpoint's sha256 and the same torch/torchao; a folder that is not
    writable just goes without it."""
    from importlib.metadata import version

    cache = converted_cache(checkpoint)
    key = json.dumps({"source_sha256": sha256(checkpoint), "torch": torch.__version__, "torchao": version("torchao")})
    if cache.is_file():
        extra = {"kdq": ""}
        try:
            module = load_pt2(cache, extra)
            if extra["kdq"] == key:
                return module
        except ExportError:
            pass
    model = convert()
    try:
        with atomic_output(cache) as tmp:
            torch.export.save(_export_program(model, image_size), tmp, extra_files={"kdq": key})
    except (OSError, KdqError):
        pass
    return model


def load_pt2(path: Path, extra_files: dict[str, str] | None = None) -> torch.nn.Module:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the quantized_decomposed ops

    try:
        return inference_only(torch.export.load(str(path), extra_files=extra_files).module())
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise ExportError(f"{path}: not a loadable torch.export program ({first})") from e


def export_executorch(model: torch.nn.Module, path: Path, image_size: int = 32) -> dict:
    """Lower to ExecuTorch with the XNNPACK partitioner; returns which operators run in the delegate."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = _export_program(model, image_size, PTE_MAX_BATCH)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        program = edge.to_executorch()
    path.write_bytes(program.buffer)
    return delegation_summary(info)


def delegation_summary(info) -> dict:
    """Counts from ExecuTorch's DelegationInfo, and the int8-relevant operators left outside the delegate."""
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated}
    return {
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "delegated_convolutions": sum(
            b.delegated for op, b in info.delegation_by_operator.items() if "convolution" in op
        ),
        "int8_ops_outside": {op: n for op, n in outside.items() if any(k in op for k in INT8_OPS)},
    }


def pte_runner(path: Path, threads: int = 1):
    """A numpy → numpy runner of a .pte's `forward` in ExecuTorch's runtime; splits batches > PTE_MAX_BATCH.

    XNNPACK's kernels run on ExecuTorch's process-wide thread pool, sized by the first runner of the process
    (`threads`): resizing it under a loaded program crashed XNNPACK (invalid state, then a segfault)."""
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise ExportError(f"{path}: the ExecuTorch runtime is not installed (the extra `kdq[executorch]`)") from e
    set_executorch_threads(threads)
    try:
        method = Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise ExportError(f"{path}: not a loadable ExecuTorch program ({first})") from e

    def run(x: np.ndarray) -> np.ndarray:
        parts = [
            method.execute([torch.from_numpy(np.ascontiguousarray(x[i : i + PTE_MAX_BATCH]))])[0].numpy()
            for i in range(0, len(x), PTE_MAX_BATCH)
        ]
        return np.concatenate(parts)

    return run


_pool: list[int] = []  # the thread count ExecuTorch's pool was given in this process


def set_executorch_threads(threads: int) -> None:
    """Size the thread pool once per process (ExecuTorch's `_unsafe_reset_threadpool`, before any load)."""
    from executorch.extension.pybindings import portable_lib

    if _pool and _pool[0] != threads:
        raise ExportError(f"ExecuTorch's thread pool has {_pool[0]} threads in this process; it cannot change")
    if not _pool:
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        _pool.append(threads)


def executorch_threads() -> int | None:
    return _pool[0] if _pool else None
