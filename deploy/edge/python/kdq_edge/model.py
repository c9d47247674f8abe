"""The int8 ONNX model of an export folder, run with ONNX Runtime on the CPU."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    """A verified export: `classify(x)` on preprocessed batches, `classify_paths(paths)` on image files."""

    def __init__(self, manifest: Manifest, threads: int = 1):
        import onnxruntime as ort

        self.manifest = manifest
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

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) → float32 logits (N, classes)."""
        return self.session.run([self.manifest.output_name], {self.manifest.input_name: x})[0]

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


def load_model(model: Path | str, threads: int = 1) -> EdgeModel:
    """Read DIR/manifest.json, check model.onnx against its sha256, and open it with ONNX Runtime."""
    return EdgeModel(load_manifest(model), threads)
