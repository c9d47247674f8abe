"""The int8 model of an export folder, run on the CPU: model.onnx with ONNX Runtime, or model.pte with the
ExecuTorch runtime (the optional extra `kdq-edge[executorch]`).

The ONNX path never imports torch. ExecuTorch's Python bindings are built on libtorch, so the .pte path
imports torch through them; a device without Python runs the same .pte with ExecuTorch's C++ runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdq_edge.errors import EdgeError, ImageError
from kdq_edge.image import load_image, normalize, resize
from kdq_edge.manifest import Manifest, load_manifest, verified_bytes


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass
class Result:
    path: str
    top: list[Prediction]
    mode: str = "RGB"  # the image's mode before conversion to RGB
    logits: list[float] = field(default_factory=list)

    def to_json(self, with_logits: bool = False) -> dict:
        d = {
            "path": self.path,
            "mode": self.mode,
            "top": [{"index": p.index, "label": p.label, "probability": p.probability} for p in self.top],
        }
        if with_logits:
            d["logits"] = self.logits
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class EdgeModel:
    """A verified export: `classify(x)` on preprocessed batches, `classify_paths(paths)` on image files.

    Only a certified export opens (`Manifest.require_certified`); `allow_uncertified=True` opens any other."""

    def __init__(self, manifest: Manifest, threads: int = 1, fmt: str = "auto", allow_uncertified: bool = False):
        if not allow_uncertified:
            manifest.require_certified()
        self.manifest = manifest
        self.format = pick_format(manifest, fmt)
        if self.format == "executorch":
            self._logits = _executorch_logits(manifest, threads)
        else:
            self._logits = self._open_onnx(threads)

    def _open_onnx(self, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        manifest = self.manifest
        model_bytes = verified_bytes(manifest, "onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        for key, value in manifest.onnxruntime_config.items():  # e.g. the arm target's exact int8 kernels
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            path = manifest.artifact_path("onnx")
            raise EdgeError(f"{path}: ONNX Runtime {ort.__version__} cannot load it ({e})") from e
        names = [i.name for i in self.session.get_inputs()]
        if names != [manifest.input_name]:
            raise EdgeError(f"{manifest.artifact_path('onnx')}: inputs {names} differ from the manifest's")
        return lambda x: self.session.run([manifest.output_name], {manifest.input_name: x})[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) → float32 logits (N, classes)."""
        return self._logits(x)

    def top_k(self, logits: np.ndarray, k: int) -> list[list[Prediction]]:
        probs = softmax(logits)
        k = min(k, probs.shape[1])
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: lowest class index first
        return [
            [Prediction(int(i), self.manifest.classes[int(i)], float(p[i])) for i in row]
            for row, p in zip(order, probs, strict=True)
        ]

    def iter_classify(
        self, paths: Sequence[Path | str], k: int = 5, batch_size: int = 32, alpha: str = "refuse"
    ) -> Iterator[Result | ImageError]:
        """One Result (or the ImageError of an image that cannot be used) per path, in order, batch by batch."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            pixels, modes, slots = [], {}, []
            out: list[Result | ImageError | None] = [None] * len(chunk)
            for j, p in enumerate(chunk):
                try:
                    im, modes[j] = load_image(p, alpha)
                    pixels.append(resize(im, self.manifest))
                    slots.append(j)
                except ImageError as e:
                    out[j] = e
            if pixels:
                logits = self.logits(normalize(np.stack(pixels), self.manifest))
                for j, row, top in zip(slots, logits, self.top_k(logits, k), strict=True):
                    out[j] = Result(str(chunk[j]), top, modes[j], [float(v) for v in row])
            yield from out  # type: ignore[misc]

    def classify_paths(self, paths: Sequence[Path | str], k: int = 5, alpha: str = "refuse") -> list[Result]:
        """Like iter_classify, but raises the first ImageError."""
        results = []
        for r in self.iter_classify(paths, k, alpha=alpha):
            if isinstance(r, ImageError):
                raise r
            results.append(r)
        return results


FORMATS = ("auto", "onnx", "executorch")


def pick_format(manifest: Manifest, fmt: str) -> str:
    """`auto`: model.onnx when the export has one, else model.pte."""
    if fmt not in FORMATS:
        raise EdgeError(f"unknown model format {fmt!r}; choose from: {', '.join(FORMATS)}")
    if fmt == "auto":
        return "onnx" if "onnx" in manifest.artifacts or "executorch" not in manifest.artifacts else "executorch"
    manifest.artifact_path(fmt)  # a one-line error when the export lacks it
    return fmt


def _executorch_logits(manifest: Manifest, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The verified bytes of model.pte in ExecuTorch's runtime; batches above the program's planned size
    (the manifest's `executorch.max_batch`) are split."""
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError as e:
        raise EdgeError(
            f"{manifest.artifact_path('executorch')}: running a .pte needs the ExecuTorch runtime: "
            f"pip install 'kdq-edge[executorch]' ({e})"
        ) from e
    data = verified_bytes(manifest, "executorch")
    if portable_lib._threadpool_get_thread_count() != threads:
        # XNNPACK's kernels run on this process-wide pool; resizing it under a loaded program crashes XNNPACK,
        # so a process runs its .pte models at one thread count (the first one's).
        portable_lib._unsafe_reset_threadpool(threads)
    try:
        method = Runtime.get().load_program(data).load_method("forward")
    except Exception as e:
        raise EdgeError(f"{manifest.artifact_path('executorch')}: ExecuTorch cannot load it ({e})") from e
    step = int(manifest.raw.get("executorch", {}).get("max_batch", 1))

    def run(x: np.ndarray) -> np.ndarray:
        parts = [method.execute([torch.from_numpy(np.ascontiguousarray(x[i : i + step]))])[0].numpy()
                 for i in range(0, len(x), step)]  # fmt: skip
        return np.concatenate(parts)

    return run


def load_model(model: Path | str, threads: int = 1, fmt: str = "auto", allow_uncertified: bool = False) -> EdgeModel:
    """Read DIR/manifest.json, check the model file against its sha256, and open it (`fmt`: see FORMATS) if its
    certificate passed (or `allow_uncertified`)."""
    return EdgeModel(load_manifest(model), threads, fmt, allow_uncertified)
