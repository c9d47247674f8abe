"""Accuracy, per-class accuracy, confusion matrix, size and CPU latency of a model."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from kdq.data import Normalize, Split
from kdq.models import count_parameters


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    normalize: Normalize,
    batch_size: int = 256,
) -> torch.Tensor:
    """Float logits (N, C) on the CPU for uint8 images (N, 3, H, W), in batches."""
    device = normalize.mean.device
    outs = [
        model(normalize(images[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outs)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    pred = logits.argmax(1)
    cm = confusion_matrix(labels.numpy(), pred.numpy(), labels=list(range(len(classes))))
    per_class = {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(classes)}
    return {
        "top1": float((pred == labels).float().mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the serialized weights: what a user would ship for this model."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def median_ms(step: Callable[[], object], warmup: int, runs: int) -> float:
    """Median wall-clock milliseconds of `step()` after `warmup` untimed calls (kdq's one timer)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def cpu_latency_ms(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1,
    image_size: int = 32,
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = None,
) -> float:
    """Median wall-clock milliseconds of one forward pass on the CPU, after warm-up."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
        return median_ms(lambda: model(x), warmup, runs)
    finally:
        torch.set_num_threads(previous)


def evaluate_model(
    model: nn.Module, test: Split, normalize: Normalize, classes: list[str], latency_runs: int = 50
) -> dict:
    """The seed's check_accuracy.py as one dict: accuracy, per class, confusion, size, latency."""
    model = model.eval().cpu()
    logits = predict_logits(model, test.images, normalize)
    metrics = classification_metrics(logits, test.labels, classes)
    size = test.images.shape[-1]
    b1 = cpu_latency_ms(model, 1, runs=latency_runs, image_size=size)
    b64 = cpu_latency_ms(model, 64, runs=max(5, latency_runs // 5), warmup=3, image_size=size)
    return {
        **metrics,
        "parameters": count_parameters(model),
        "size_bytes": state_dict_bytes(model),
        "latency_ms_b1": b1,
        "throughput_img_s_b64": 64 / (b64 / 1000),
    }
