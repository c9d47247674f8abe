"""`kdq plan`: which students fit a latency budget on this CPU, timed in the target's own runtime.

int8 pays off unevenly across architectures: MobileNetV2 x0.35's int8 ONNX model was slower than its fp32 one at
batch 64 on 2 threads (results/demo/README.md), while ResNets run their int8 convolutions densely. So a budget
is checked by timing, not estimated from MACs. Latency needs no trained weights: each candidate is built
untrained, made int8 by the target's flow (post-training quantization calibrated on random images), exported to
ONNX as `kdq export` writes it, and timed beside its fp32 export in ONNX Runtime at the batch size and thread
count asked, with the target's session settings. Rounds interleave, each timing every candidate's int8 and fp32
model once, so a slow spell of a shared machine spreads over all of them; a figure is the median of its rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdq.artifacts import ARTIFACTS, ExportError, Target
from kdq.config import MOBILENET_STUDENTS
from kdq.cpu import environment
from kdq.evaluate import median_ms
from kdq.export import export_onnx, write_artifacts
from kdq.int8run import ort_session
from kdq.models import build_model, count_macs, count_parameters
from kdq.quant import get_flow
from kdq.recipes import stem_kwargs

WIDTHS = (0.35, 0.5, 0.75, 1.0)
CALIBRATION_BATCHES = 4  # of 16 random images: enough for every observer to see a range


@dataclass(frozen=True)
class Candidate:
    """A student architecture: a MobileNetV2 layout at a width multiplier, or a CIFAR ResNet (width 1)."""

    arch: str
    width: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.arch}_x{self.width:g}" if self.arch in MOBILENET_STUDENTS else self.arch

    def build(self, num_classes: int, image_size: int) -> nn.Module:
        kwargs = {"width_mult": self.width} if self.arch in MOBILENET_STUDENTS else {}
        return build_model(self.arch, num_classes, **kwargs, **stem_kwargs(image_size)).eval()


# Every MobileNetV2 width x layout, and the shallow CIFAR ResNets (dense int8 convolutions, no depthwise ones).
STUDENT_FAMILY: tuple[Candidate, ...] = (
    *(Candidate(arch, w) for arch in MOBILENET_STUDENTS for w in WIDTHS),
    *(Candidate(arch) for arch in ("resnet8", "resnet14", "resnet20")),
)


class PlanError(ExportError):
    """A plan that cannot be measured: a target whose runtime `kdq plan` does not time."""


def candidates(names: Sequence[str] = ()) -> tuple[Candidate, ...]:
    """The family's candidates of these names, in the family's order; every one when none is named."""
    by_name = {c.name: c for c in STUDENT_FAMILY}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise PlanError(f"unknown candidate {unknown[0]!r}; choose from: {', '.join(by_name)}")
    return tuple(c for c in STUDENT_FAMILY if not names or c.name in names)


def check_target(target: Target) -> None:
    if "onnx" not in target.formats:
        raise PlanError(
            f"kdq plan times ONNX Runtime; target {target.name!r} exports {', '.join(target.formats)} only "
            "(ExecuTorch's lowering takes ~45 s a model: time a mobile student with kdq export --target mobile)"
        )


def int8_onnx(model: nn.Module, target: Target, folder: Path, image_size: int) -> Path:
    """The untrained `model` made int8 by the target's flow (PTQ on random images) and exported to ONNX."""
    flow = get_flow(target.flow)
    prepared = flow.prepare(model, target.backend, qat=False, image_size=image_size)
    generator = torch.Generator().manual_seed(0)
    flow.calibrate(prepared, (torch.randn(16, 3, image_size, image_size, generator=generator)
                              for _ in range(CALIBRATION_BATCHES)))  # fmt: skip
    int8 = flow.convert(prepared, target.backend)
    folder.mkdir(parents=True)
    write_artifacts(int8, target.flow, replace(target, formats=["onnx"]), folder, image_size)
    return folder / ARTIFACTS["onnx"]


def measure(
    candidates: Sequence[Candidate],
    target: Target,
    *,
    batch: int = 1,
    threads: int = 1,
    image_size: int = 32,
    num_classes: int = 10,
    rounds: int = 3,
    runs: int = 20,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """int8 and fp32 ONNX Runtime latency (ms) of every candidate, with its size; see the module docstring."""
    check_target(target)
    rows, sessions = [], {}
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(candidates):
            torch.manual_seed(0)
            model = c.build(num_classes, image_size)
            fp32 = Path(tmp) / f"{i}-fp32.onnx"
            export_onnx(model, fp32, target.onnx_opset, image_size)
            int8 = int8_onnx(model, target, Path(tmp) / f"{i}-int8", image_size)
            config = target.onnxruntime_config
            sessions[i] = {"int8": ort_session(str(int8), threads, config), "fp32": ort_session(str(fp32), threads)}
            rows.append({"name": c.name, "arch": c.arch, "width": c.width, "parameters": count_parameters(model),
                         "macs": count_macs(model, image_size), "int8_onnx_bytes": int8.stat().st_size,
                         "fp32_onnx_bytes": fp32.stat().st_size})  # fmt: skip
            progress(f"exported {c.name}")
        flat = {(i, precision): s for i, pair in sessions.items() for precision, s in pair.items()}
        timings = time_interleaved(flat, x, rounds, runs, lambda r: progress(f"timed round {r + 1} of {rounds}"))
    for i, row in enumerate(rows):
        row["int8_ms"], row["fp32_ms"] = (statistics.median(timings[i, p]) for p in ("int8", "fp32"))
        row["int8_rounds_ms"], row["fp32_rounds_ms"] = timings[i, "int8"], timings[i, "fp32"]
    return rows


def time_interleaved(
    sessions: dict, x: np.ndarray, rounds: int, runs: int, on_round: Callable[[int], None] = lambda _: None
) -> dict:
    """Median ms of `runs` calls of every ONNX Runtime session on `x`, per round: {key: [ms of each round]}.

    Each round times every session once; odd rounds run the order backwards, so no model always follows the
    same one, and a slow spell of a shared machine spreads over all of them.
    """
    timings: dict = {key: [] for key in sessions}
    warmup = 5 if len(x) == 1 else 2
    for r in range(rounds):
        for key, session in (reversed if r % 2 else iter)(list(sessions.items())):
            feed = {session.get_inputs()[0].name: x}
            step = lambda s=session, f=feed: s.run(None, f)  # noqa: E731
            timings[key].append(median_ms(step, warmup, runs))
        on_round(r)
    return timings


def plan(rows: list[dict], budget_ms: float) -> list[dict]:
    """The rows with `within_budget` marked (int8 median at or under the budget), fastest first."""
    return sorted(({**r, "within_budget": r["int8_ms"] <= budget_ms} for r in rows), key=lambda r: r["int8_ms"])


def run_plan(
    family: Sequence[Candidate],
    target: Target,
    budget_ms: float,
    *,
    batch: int = 1,
    threads: int = 1,
    image_size: int = 32,
    num_classes: int = 10,
    rounds: int = 3,
    runs: int = 20,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Time `family` on this CPU (`measure`) and mark those within `budget_ms`: the record that `kdq plan`,
    `kdq sweep` and `bench.plan` write, its settings assembled in one place."""
    settings = dict(batch=batch, threads=threads, image_size=image_size, num_classes=num_classes, rounds=rounds,
                    runs=runs)  # fmt: skip
    rows = measure(family, target, progress=progress, **settings)
    return {
        "target": target.name,
        "budget_ms": budget_ms,
        **settings,
        "flow": target.flow,
        "backend": target.backend,
        "onnxruntime_config": target.onnxruntime_config,
        "method": "untrained models, int8 by PTQ on random images; ONNX Runtime, median of interleaved rounds "
        "(odd rounds in reverse order)",
        "where": environment({"onnxruntime": threads}),
        "candidates": plan(rows, budget_ms),
    }


def format_table(result: dict) -> str:
    head = (f"{'candidate':<24} {'params':>8} {'MMACs':>7} {'int8 ms':>8} {'fp32 ms':>8} {'int8 speed-up':>13}"
            "  within budget")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in result["candidates"]:
        mark = "yes" if r["within_budget"] else "no"
        lines.append(f"{r['name']:<24} {r['parameters'] / 1e6:>7.2f}M {r['macs'] / 1e6:>7.1f} {r['int8_ms']:>8.3f} "
                     f"{r['fp32_ms']:>8.3f} {r['fp32_ms'] / r['int8_ms']:>12.2f}x  {mark}")  # fmt: skip
    n = sum(r["within_budget"] for r in result["candidates"])
    lines.append(f"{n} of {len(result['candidates'])} within {result['budget_ms']:g} ms (int8, batch "
                 f"{result['batch']}, {result['threads']} thread(s), target {result['target']}; "
                 f"{result['where']['cpu_model']})")  # fmt: skip
    return "\n".join(lines)
