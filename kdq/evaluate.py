"""Accuracy, per-class accuracy, confusion matrix, size and CPU latency of a model; one model against another on
the same test images (`paired_gain`)."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from kdq.data import Normalize, Split
from kdq.models import count_parameters
from kdq.stats import Paired, drop_interval, mcnemar_p


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
    correct = pred == labels
    return {
        "top1": float(correct.float().mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        # one character per test image, in test order, "1" where right: two models on the same images compare
        # image by image (a paired test, `kdq.stats`), and 10,000 images stay one line of JSON
        "correct": "".join("1" if ok else "0" for ok in correct.tolist()),
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


@dataclass(frozen=True)
class Gain:
    """What `candidate` gains over `reference` in top-1 on the same n test images, with its paired 95% interval
    (`kdq.stats.drop_interval`, negated) and the exact McNemar p-value."""

    candidate: str
    reference: str
    value: float
    ci: tuple[float, float]
    p: float
    n: int

    @property
    def verdict(self) -> str:
        """ "ahead" or "behind" only when the interval excludes zero; otherwise the two are a "tie"."""
        return "ahead" if self.ci[0] > 0 else "behind" if self.ci[1] < 0 else "tie"

    def sentence(self) -> str:
        lo, hi = self.ci
        return (
            f"{self.candidate} - {self.reference} on the same {self.n:,} test images: {self.value * 100:+.2f} pt "
            f"(95% CI {lo * 100:+.2f} to {hi * 100:+.2f}, exact McNemar p = {self.p:.2g}): "
            + {"ahead": f"{self.candidate} is ahead", "behind": f"{self.candidate} is behind"}.get(
                self.verdict, "a tie (the interval includes zero)"
            )
        )


def paired_gain(results: dict, candidate: str = "student", reference: str = "baseline") -> Gain | None:
    """`candidate` against `reference` from evaluation results (`kdq evaluate`'s JSON), image by image; None when
    either is missing or was evaluated before kdq recorded each image's outcome."""
    a, b = results.get(reference, {}).get("correct"), results.get(candidate, {}).get("correct")
    if not a or not b or len(a) != len(b):
        return None
    paired = Paired.of([c == "1" for c in a], [c == "1" for c in b])
    lo, hi = drop_interval(paired)
    return Gain(candidate, reference, -paired.drop, (-hi, -lo), mcnemar_p(paired), paired.n)
