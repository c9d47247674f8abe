"""`kdq pipeline`: every stage of a run, in order, ending with the comparison table."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import torch

from kdq import recipes
from kdq.artifacts import ExportError, load_target
from kdq.config import QAT_STAGE, Preset, qat_stage, with_overrides
from kdq.cpu import describe, environment
from kdq.errors import KdqError
from kdq.evaluate import paired_gain
from kdq.export import existing_certificate, export
from kdq.files import newer_than, save_json
from kdq.parity import format_report
from kdq.quant import get_flow
from kdq.report import teacher_lead, teacher_lead_sentence, write_report
from kdq.train import HISTORY_JSON, Runtime, setup_runtime

# The default export target of each (flow, backend): the QAT stage is trained for the target's flow and backend.
DEFAULT_TARGETS = {("eager", "x86"): "x86", ("eager", "qnnpack"): "arm", ("pt2e", "x86"): "x86-pt2e",
                   ("pt2e", "xnnpack"): "mobile"}  # fmt: skip
# The trained stages of a run, in order (RUN/<stage>/checkpoint.pt); components.py's pipeline job trains the same.
STAGES = ("teacher", "baseline", "student", QAT_STAGE)
TIMINGS_JSON = "timings.json"


def run_pipeline(
    preset: Preset,
    run_dir: Path,
    opts: recipes.RunOptions,
    export_latency_runs: int | None = None,
    target: str | None = None,
    require_teacher_ahead: bool = False,
    flow: str | None = None,
    max_drop: float | None = None,
) -> dict:
    """teacher -> baseline -> KD student -> QAT-KD student -> evaluation table -> certified int8 export.

    Under torchrun (the TorchX `pipeline` component on several processes or nodes) every process trains; the
    evaluation, the repair, the export and the report run on rank 0 alone, and the other ranks return {}.

    The QAT student is trained for the target's flow and backend (`export/<target>.toml`); without a target,
    `flow` (default: the preset's) and the preset's backend choose one from DEFAULT_TARGETS. Before
    distilling, the teacher's validation accuracy is compared with the baseline's: a teacher that is not ahead
    is a loud warning, or with `require_teacher_ahead` an error. With `max_drop` (a fraction), the QAT student is
    repaired (`kdq.repair`) into RUN/<qat stage>_repaired, and that is what is exported.
    """
    run_dir = Path(run_dir)
    target = load_target(target or default_target(flow or preset.quant.flow, preset.quant.backend))
    if flow is not None and flow != target.flow:
        raise KdqError(f"target {target.name!r} is exported from the {target.flow} flow, not {flow}: drop --flow")
    preset = with_overrides(preset, quant=with_overrides(preset.quant, backend=target.backend, flow=target.flow))
    get_flow(target.flow).check_available(target.backend)  # a missing ExecuTorch fails before training
    rt = setup_runtime(opts.device)
    clock = StepClock()
    with clock("teacher"):
        stages = {"teacher": recipes.train_teacher(preset, run_dir, opts)}
    with clock("baseline"):
        stages["baseline"] = recipes.train_student(with_overrides(preset, alpha=0.0), run_dir, opts, stage="baseline")
    _barrier(rt)  # every rank reads the histories rank 0 wrote
    check_teacher_ahead(run_dir, require_teacher_ahead)
    with clock("student"):
        stages["student"] = recipes.train_student(preset, run_dir, opts, stage="student")
    qat = qat_stage(target.flow, target.backend)
    with clock(qat):
        stages[qat] = recipes.train_student(preset, run_dir, opts, stage=qat, qat=True, init=stages["student"])
    if not rt.is_main:  # under torchrun: the trainings used every process; the rest runs once, on rank 0
        return {}
    exported = stages[qat]
    if max_drop is not None:
        with clock("repair"):
            exported = stages[f"{qat}_repaired"] = repaired_stage(stages[qat], max_drop, opts)
    eval_json = run_dir / recipes.EVALUATION_JSON
    if opts.resume and newer_than(eval_json, stages.values()):
        print(f"[pipeline] {eval_json} is newer than every checkpoint: kept", file=sys.stderr)
        results = json.loads(eval_json.read_text())
    else:
        with clock("evaluate"):
            results = recipes.evaluate_checkpoints(list(stages.values()), opts, eval_json)
    click.echo(recipes.format_table(results))
    if (gain := paired_gain(results)) is not None:
        click.echo(f"Knowledge distillation: {gain.sentence()}")
    # eager: export-x86 / export-qnnpack (by backend); pt2e: by target (export-x86-pt2e, export-mobile), so one run
    # holds both flows' exports side by side.
    out = run_dir / f"export-{target.backend if target.flow == 'eager' else target.name}"
    report = existing_certificate(out, exported, target) if opts.resume else None
    if report is not None:
        print(f"[pipeline] {out} already certifies this checkpoint for {target.name}: kept", file=sys.stderr)
    else:
        try:
            with clock("export"):
                report = export(
                    exported,
                    out,
                    target,
                    data_dir=opts.data_dir,
                    overwrite=opts.overwrite or opts.resume,
                    latency_runs=export_latency_runs,
                )
        except ExportError as e:  # the report matters most now: the failed gates, per-class plot, diagnosis
            if out.with_name(out.name + ".rejected").is_dir():
                md, _ = write_report(run_dir)
                raise ExportError(f"{str(e).splitlines()[0]}; report: {md}") from e
            raise
    click.echo(format_report(report))
    click.echo(f"{report['verdict']} int8 export -> {out}")
    with clock("report"):
        md, page = write_report(run_dir)
    click.echo(f"report -> {md} (self-contained: {page})")
    clock.record(run_dir / TIMINGS_JSON, report.get("path_seconds", {}))
    print(f"[pipeline] {preset.name} done in {clock.total():.0f}s ({clock.summary()}) -> {run_dir}", file=sys.stderr)
    return results


class StepClock:
    """Wall seconds of each step of a run, so that "the demo takes N minutes" says where they went (a step kept
    by --resume takes about none)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = round(time.perf_counter() - start, 1)

    def total(self) -> float:
        return time.perf_counter() - self.start

    def summary(self) -> str:
        return ", ".join(f"{step} {s:.0f}s" for step, s in self.seconds.items())

    def record(self, path: Path, certificate_paths: dict[str, float]) -> None:
        """RUN/timings.json: each step, the total, the extra int8 paths inside the export (an emulated one is most
        of it on a VNNI CPU), and the CPU."""
        save_json({"seconds": self.seconds, "total_seconds": round(self.total(), 1),
                   "export_int8_path_seconds": certificate_paths, "where": describe(environment())}, path)  # fmt: skip


def repaired_stage(qat: Path, max_drop: float, opts: recipes.RunOptions) -> Path:
    """RUN/<qat stage>_repaired/checkpoint.pt, kept on --resume when newer than the QAT checkpoint it repairs."""
    from kdq.repair import repair

    out = qat.parent.with_name(qat.parent.name + "_repaired") / qat.name
    if opts.resume and newer_than(out, [qat]):
        print(f"[pipeline] {out} is newer than {qat}: kept", file=sys.stderr)
        return out
    if out.exists() and not (opts.overwrite or opts.resume):
        raise KdqError(f"{out} exists; pass --overwrite (or --resume) to replace it")
    return repair(qat, out, max_drop, opts.data_dir)[0]


def _barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        torch.distributed.barrier()


def default_target(flow: str, backend: str) -> str:
    if (flow, backend) not in DEFAULT_TARGETS:
        known = ", ".join(f"{t} ({f}, {b})" for (f, b), t in DEFAULT_TARGETS.items())
        raise KdqError(f"no export target for the {flow} flow with backend {backend}; choose --target from: {known}")
    return DEFAULT_TARGETS[(flow, backend)]


class TeacherNotAheadError(KdqError):
    """The teacher is not more accurate than the student trained without it."""


def check_teacher_ahead(run_dir: Path, required: bool) -> dict | None:
    """Compare RUN/teacher's and RUN/baseline's best validation accuracy; warn (or raise) when the teacher is not
    ahead. None when there is no validation split to compare on."""
    histories = {}
    for stage in ("teacher", "baseline"):
        path = run_dir / stage / HISTORY_JSON
        if not path.is_file():
            raise KdqError(f"{path} not found: the teacher and the baseline must be trained before distilling")
        histories[stage] = json.loads(path.read_text())
    lead = teacher_lead(histories)
    if lead is None:
        print("[pipeline] no validation split: teacher vs baseline not compared", file=sys.stderr)
    elif lead["ahead"]:
        print(f"[pipeline] {teacher_lead_sentence(lead)}", file=sys.stderr)
    elif required:
        raise TeacherNotAheadError(
            f"teacher {lead['teacher']:.2%} is not ahead of the no-KD baseline {lead['baseline']:.2%} (validation); "
            "train it longer or pick a larger one (or drop --require-teacher-ahead)"
        )
    else:
        bar = "!" * 100
        click.echo(f"{bar}\n[pipeline] WARNING {teacher_lead_sentence(lead).replace('**', '')}\n{bar}", err=True)
    return lead
