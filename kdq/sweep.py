"""`kdq sweep --budget-ms B`: from a latency budget on this CPU to the most accurate certified int8 model within it.

    prepare  `kdq plan` on this CPU (RUN/sweep/plan.json), the teacher (RUN/teacher) and its soft targets
             (RUN/soft_targets.pt): trained once, whatever the number of candidates;
    train    each candidate within budget, under the run's recipe: KD student -> QAT-KD student -> certified int8
             export, in RUN/sweep/NAME (its soft targets are a hard link to the run's: one file on disk);
    gather   the teacher too, in float (ONNX) and in int8 (PTQ, certified like any export); then every model's
             test accuracy (ONNX Runtime, the exported file itself) and latency (interleaved rounds, as `kdq plan`
             times), the accuracy-vs-latency Pareto front, the choice, RUN/sweep.json and the run's report.

The steps are separate so that a cluster runs `train` as parallel jobs (deploy/sweep.py, through TorchX); on one
machine `--step all` runs them in order. A student is recommended only where it beats quantizing the teacher:
the int8 teacher is the answer when it fits the budget and the best certified student is not ahead of it on the
same test images (a paired interval that excludes zero, `kdq.evaluate.Gain`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from kdq import checkpoint as ck
from kdq import plan, recipes
from kdq.artifacts import ARTIFACTS, MANIFEST, PARITY_JSON, ExportError, Target, load_target
from kdq.config import MOBILENET_STUDENTS, Preset, qat_stage, with_overrides
from kdq.cpu import environment
from kdq.data import load_test_split
from kdq.errors import KdqError
from kdq.evaluate import Gain, paired_gain
from kdq.export import existing_certificate, export, export_onnx
from kdq.files import check_writable, newer_than, save_json
from kdq.int8run import ort_session
from kdq.parity import certificate_headline
from kdq.report import SWEEP_JSON, write_report
from kdq.stats import rate_interval
from kdq.train import CHECKPOINT, setup_runtime

SWEEP_DIR = "sweep"  # RUN/sweep/{plan.json, NAME/, teacher/}
PLAN_JSON = "plan.json"
TEACHER_FP32, TEACHER_INT8 = "teacher (fp32)", "teacher (int8)"
CERTIFIED = "certified"


class SweepError(KdqError):
    """A sweep that cannot go on: nothing within budget, or a step run before the one it needs."""


def _prepared(preset: Preset, target: Target) -> Preset:
    """The recipe with its QAT flow and backend set to the target's, as `kdq pipeline` trains it."""
    return with_overrides(preset, quant=with_overrides(preset.quant, backend=target.backend, flow=target.flow))


def prepare(
    preset: Preset,
    run_dir: Path,
    opts: recipes.RunOptions,
    target: str,
    budget_ms: float,
    *,
    batch: int = 1,
    threads: int = 1,
    rounds: int = 3,
    runs: int = 20,
    names: Sequence[str] = (),
) -> list[str]:
    """Time the candidates (RUN/sweep/plan.json), train the teacher and its soft targets; the names within budget."""
    t = load_target(target)
    plan.check_target(t)
    family = plan.candidates(names)
    folder = Path(run_dir) / SWEEP_DIR
    check_writable(folder)
    classes = len(load_test_split(preset.dataset, opts.data_dir, opts.download, preset.image_size).classes)
    result = plan.run_plan(family, t, budget_ms, batch=batch, threads=threads, image_size=preset.image_size,
                           num_classes=classes, rounds=rounds, runs=runs,
                           progress=lambda what: print(f"[sweep] plan: {what}", file=sys.stderr))  # fmt: skip
    save_json(result, folder / PLAN_JSON)
    click.echo(plan.format_table(result))
    within = [r["name"] for r in result["candidates"] if r["within_budget"]]
    if not within:
        fastest = result["candidates"][0]
        raise SweepError(f"no candidate within {budget_ms:g} ms on this CPU: the fastest, {fastest['name']}, takes "
                         f"{fastest['int8_ms']:.3f} ms (int8, batch {batch}); raise --budget-ms")  # fmt: skip
    preset = _prepared(preset, t)
    teacher = recipes.train_teacher(preset, run_dir, opts)
    data = recipes.load_data(preset, opts)
    recipes.soft_targets_for(teacher, data, Path(run_dir), opts, setup_runtime(opts.device))  # kept when still valid
    print(f"[sweep] within budget: {', '.join(within)}", file=sys.stderr)
    return within


def candidate_preset(preset: Preset, name: str) -> Preset:
    """The run's recipe with this candidate as its student."""
    (c,) = plan.candidates([name])
    return with_overrides(preset, student=c.arch, student_width=c.width if c.arch in MOBILENET_STUDENTS else 1.0)


def train_candidate(
    preset: Preset, run_dir: Path, opts: recipes.RunOptions, target: str, name: str, latency_runs: int | None = None
) -> dict:
    """RUN/sweep/NAME: the KD student, its QAT-KD student, and its int8 export for the target, certified (or
    rejected: the certificate's verdict is a result too). Returns the certificate."""
    run_dir, t = Path(run_dir), load_target(target)
    teacher, soft = run_dir / "teacher" / CHECKPOINT, run_dir / recipes.SOFT_TARGETS
    if not teacher.is_file() or not soft.is_file():
        raise SweepError(f"{run_dir} has no teacher and soft targets yet: run `kdq sweep --step prepare` first")
    folder = run_dir / SWEEP_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / recipes.SOFT_TARGETS
    if not (link.exists() and os.path.samefile(link, soft)):
        link.unlink(missing_ok=True)
        os.link(soft, link)  # one file on disk; recipes checks its key (teacher, data) before use
    p = _prepared(candidate_preset(preset, name), t)
    student = recipes.train_student(p, folder, opts, stage="student", teacher_path=teacher)
    qat = recipes.train_student(p, folder, opts, stage=qat_stage(t.flow, t.backend), qat=True, init=student,
                                teacher_path=teacher)  # fmt: skip
    report = _certified(qat, folder / f"export-{t.name}", t, opts, latency_runs)
    click.echo(f"[sweep] {name}: {certificate_headline(report)}")
    return report


def _certified(checkpoint: Path, out: Path, t: Target, opts: recipes.RunOptions, latency_runs: int | None) -> dict:
    """The export's certificate: kept on --resume when it already certifies this checkpoint; a rejected export
    stays in OUT.rejected and its certificate is returned, not raised."""
    report = existing_certificate(out, checkpoint, t) if opts.resume else None
    if report is not None:
        print(f"[sweep] {out} already certifies {checkpoint}: kept", file=sys.stderr)
        return report
    rejected = out.with_name(out.name + ".rejected")
    try:
        report = export(checkpoint, out, t, data_dir=opts.data_dir, overwrite=True, latency_runs=latency_runs)
    except ExportError as e:
        if not (rejected / PARITY_JSON).is_file():
            raise
        shutil.rmtree(out, ignore_errors=True)  # an earlier export of another checkpoint must not stand for this one
        print(f"[sweep] {checkpoint}: {str(e).splitlines()[0]}", file=sys.stderr)
        return json.loads((rejected / PARITY_JSON).read_text())
    shutil.rmtree(rejected, ignore_errors=True)
    return report


def within_budget(run_dir: Path) -> list[str]:
    """The candidates RUN/sweep/plan.json found within budget."""
    path = Path(run_dir) / SWEEP_DIR / PLAN_JSON
    if not path.is_file():
        raise SweepError(f"{path} not found: run `kdq sweep --step prepare` first")
    return [r["name"] for r in json.loads(path.read_text())["candidates"] if r["within_budget"]]


def _export_folder(out: Path) -> Path:
    return out if out.is_dir() else out.with_name(out.name + ".rejected")


def quantized_teacher(
    preset: Preset, run_dir: Path, opts: recipes.RunOptions, t: Target, latency_runs: int | None = None
) -> tuple[Path, Path]:
    """RUN/sweep/teacher: the teacher made int8 by post-training quantization and certified like any export, and
    its fp32 ONNX model. Returns (export folder, fp32 ONNX file)."""
    teacher = Path(run_dir) / "teacher" / CHECKPOINT
    folder = Path(run_dir) / SWEEP_DIR / "teacher"
    ptq = folder / "teacher_ptq" / CHECKPOINT
    if not (opts.resume and newer_than(ptq, [teacher])):
        recipes.quantize_static(teacher, ptq, replace(opts, overwrite=True), backend=t.backend,
                                batches=preset.quant.calibration_batches, flow=t.flow)  # fmt: skip
    out = folder / f"export-{t.name}"
    _certified(ptq, out, t, opts, latency_runs)
    fp32 = folder / "fp32.onnx"
    if not (opts.resume and newer_than(fp32, [teacher])):
        ckpt = ck.load_checkpoint(teacher)
        export_onnx(ck.model_from_checkpoint(ckpt, teacher).eval(), fp32, t.onnx_opset, ck.input_size(ckpt))
    return _export_folder(out), fp32


def _test_accuracy(onnx: Path, manifest: dict, images: np.ndarray, labels: np.ndarray, config: dict) -> str:
    """One character per test image, "1" where the ONNX model is right (kdq.evaluate's `correct`)."""
    pre = manifest["preprocessing"]
    mean, std = (np.asarray(pre[k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    session = ort_session(onnx, len(os.sched_getaffinity(0)), config)
    name = session.get_inputs()[0].name
    preds = [session.run(None, {name: (images[i : i + 256] / np.float32(255) - mean) / std})[0].argmax(1)
             for i in range(0, len(images), 256)]  # fmt: skip
    return "".join("1" if ok else "0" for ok in (np.concatenate(preds) == labels))


def _points(run_dir: Path, t: Target, names: Sequence[str], teacher_export: Path, teacher_fp32: Path) -> list[dict]:
    """Every model of the sweep with its ONNX file, certificate verdict and manifest (students, then the teacher)."""
    points = []
    for kind, name, folder in [*(("student", n, run_dir / SWEEP_DIR / n / f"export-{t.name}") for n in names),
                               ("teacher_int8", TEACHER_INT8, teacher_export)]:  # fmt: skip
        folder = _export_folder(folder)
        if not (folder / MANIFEST).is_file():
            raise SweepError(f"{folder} not found: run `kdq sweep --step train --only {name}` first")
        manifest = json.loads((folder / MANIFEST).read_text())
        verdict = manifest.get("certificate", {}).get("verdict", "not certified")
        arch = manifest["source"]["arch"]
        points.append({"name": name, "kind": kind, "arch": arch["name"], "width": arch["kwargs"].get("width_mult", 1.0),
                       "verdict": verdict, "export": str(folder), "onnx": str(folder / ARTIFACTS["onnx"]),
                       "manifest": manifest})  # fmt: skip
    teacher = points[-1]  # the float teacher's preprocessing is its int8 export's
    points.append({"name": TEACHER_FP32, "kind": "teacher_fp32", "arch": teacher["arch"], "width": 1.0,
                   "verdict": "float", "export": None, "onnx": str(teacher_fp32),
                   "manifest": teacher["manifest"]})  # fmt: skip
    return points


def gather(
    preset: Preset,
    run_dir: Path,
    opts: recipes.RunOptions,
    target: str,
    latency_runs: int | None = None,
    names: Sequence[str] | None = None,
) -> dict:
    """The teacher in float and int8, every model's test accuracy and latency, the front and the choice:
    RUN/sweep.json, the chosen export's manifest["budget"], and the run's report."""
    run_dir, t = Path(run_dir), load_target(target)
    names = names or within_budget(run_dir)
    planned = json.loads((run_dir / SWEEP_DIR / PLAN_JSON).read_text())
    teacher_export, teacher_fp32 = quantized_teacher(_prepared(preset, t), run_dir, opts, t, latency_runs)
    points = _points(run_dir, t, names, teacher_export, teacher_fp32)
    data = load_test_split(preset.dataset, opts.data_dir, opts.download, preset.image_size)
    images, labels = data.test.images.numpy(), data.test.labels.numpy()
    for p in points:
        config = t.onnxruntime_config if p["kind"] != "teacher_fp32" else {}
        p["correct"] = _test_accuracy(Path(p["onnx"]), p["manifest"], images, labels, config)
        k, n = p["correct"].count("1"), len(p["correct"])
        p.update(top1=k / n, ci=list(rate_interval(k, n)), n=n, onnx_bytes=Path(p["onnx"]).stat().st_size)
    batch, threads, rounds, runs = (planned[k] for k in ("batch", "threads", "rounds", "runs"))
    x = np.random.default_rng(0).standard_normal((batch, 3, preset.image_size, preset.image_size), dtype=np.float32)
    sessions = {i: ort_session(p["onnx"], threads, t.onnxruntime_config if p["kind"] != "teacher_fp32" else {})
                for i, p in enumerate(points)}  # fmt: skip
    timings = plan.time_interleaved(sessions, x, rounds, runs)
    budget = planned["budget_ms"]
    for i, p in enumerate(points):
        p.update(ms=statistics.median(timings[i]), rounds_ms=timings[i])
        p["within_budget"] = p["ms"] <= budget
        p.pop("manifest")
    result = {
        "budget_ms": budget, "batch": batch, "threads": threads, "rounds": rounds, "runs": runs, "target": t.name,
        "recipe": preset.name, "dataset": preset.dataset, "default_student": candidate_name(preset),
        "method": "accuracy: each exported ONNX model on the whole test split (ONNX Runtime), Wilson 95% interval; "
        "latency: the same files, median of interleaved rounds (odd rounds in reverse) at the plan's batch and threads",
        "where": environment({"onnxruntime": threads}),
        "points": points, **decide(points, candidate_name(preset)),
    }  # fmt: skip
    chosen = next((p for p in points if p["name"] == result["recommended"]), None)
    if chosen is not None:
        _record_budget(Path(chosen["export"]), result, chosen)
    save_json(result, run_dir / SWEEP_JSON)
    click.echo(format_front(result))
    md, _ = write_report(run_dir)
    click.echo(f"report -> {md}")
    return result


def candidate_name(preset: Preset) -> str:
    width = preset.student_width if preset.student in MOBILENET_STUDENTS else 1.0
    return plan.Candidate(preset.student, width).name


def pareto_front(points: list[dict]) -> list[str]:
    """Names of the deployable points (certified int8 models and the float teacher) that no other one beats on
    both axes: faster or as fast, and as accurate or more (strictly better on one), fastest first."""
    usable = [p for p in points if p["verdict"] in (CERTIFIED, "float")]

    def beaten(p: dict) -> bool:
        return any(q["ms"] <= p["ms"] and q["top1"] >= p["top1"] and (q["ms"], q["top1"]) != (p["ms"], p["top1"])
                   for q in usable)  # fmt: skip

    front = [p for p in usable if not beaten(p)]
    return [p["name"] for p in sorted(front, key=lambda p: p["ms"])]


def _gain(points: dict[str, dict], candidate: str, reference: str) -> Gain | None:
    if candidate not in points or reference not in points:
        return None
    return paired_gain({n: points[n] for n in (candidate, reference)}, candidate, reference)


def _comparison(points: dict[str, dict], candidate: str, reference: str) -> dict | None:
    gain = _gain(points, candidate, reference)
    if gain is None or candidate == reference:
        return None
    return {"candidate": candidate, "reference": reference, "gain": gain.value, "ci": list(gain.ci), "p": gain.p,
            "verdict": gain.verdict, "speedup": points[reference]["ms"] / points[candidate]["ms"],
            "sentence": gain.sentence()}  # fmt: skip


def decide(points: list[dict], default_student: str) -> dict:
    """The front, the recommended model and why: the most accurate certified student within budget, unless the
    int8 teacher fits the budget too and that student is not ahead of it (then quantize the teacher)."""
    by_name = {p["name"]: p for p in points}
    students = [p for p in points if p["kind"] == "student" and p["verdict"] == CERTIFIED and p["within_budget"]]
    teacher = by_name[TEACHER_INT8]
    teacher_fits = teacher["verdict"] == CERTIFIED and teacher["within_budget"]
    out: dict = {"front": pareto_front(points), "recommended": None}
    if not students:
        out["recommended"] = TEACHER_INT8 if teacher_fits else None
        out["decision"] = ("no certified student within budget; the int8 teacher fits it: quantize the teacher"
                           if teacher_fits else "nothing certified within budget: raise the budget")  # fmt: skip
        return out
    best = max(students, key=lambda p: (p["top1"], -p["ms"]))
    out["comparisons"] = {k: c for k, c in (("int8 teacher", _comparison(by_name, best["name"], TEACHER_INT8)),
                          ("default student", _comparison(by_name, best["name"], default_student))) if c}  # fmt: skip
    vs_teacher = out["comparisons"]["int8 teacher"]
    if teacher_fits and vs_teacher["verdict"] != "ahead":
        out["recommended"] = TEACHER_INT8
        out["decision"] = (f"the int8 teacher fits the budget ({teacher['ms']:.3f} ms) and the best certified "
                           f"student, {best['name']}, is not ahead of it ({vs_teacher['sentence']}): quantize the "
                           "teacher, no student needed")  # fmt: skip
        return out
    if teacher["verdict"] != CERTIFIED:
        why = f"the int8 teacher was not certified ({teacher['verdict']})"
    elif not teacher["within_budget"]:
        why = f"the int8 teacher takes {teacher['ms']:.3f} ms, over the budget"
    else:
        why = "it is ahead of the int8 teacher"
    out["recommended"] = best["name"]
    out["decision"] = (f"{best['name']}: the most accurate certified student within budget ({best['ms']:.3f} ms), "
                       f"recommended because {why}; {vs_teacher['sentence']}")  # fmt: skip
    return out


def _record_budget(export_dir: Path, result: dict, chosen: dict) -> None:
    """The chosen export's manifest says which budget it was chosen for and what it measured against it."""
    path = export_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["budget"] = {"ms": result["budget_ms"], "batch": result["batch"], "threads": result["threads"],
                          "measured_ms": chosen["ms"], "rounds_ms": chosen["rounds_ms"], "method": result["method"],
                          "cpu": result["where"]["cpu_model"], "sweep": SWEEP_JSON}  # fmt: skip
    save_json(manifest, path)


def format_front(result: dict) -> str:
    head = f"{'model':<24} {'verdict':<12} {'test top-1 (95% CI)':<24} {'ms':>7}  within  front"
    lines = [head, "-" * len(head)]
    for p in sorted(result["points"], key=lambda p: p["ms"]):
        acc = f"{p['top1']:.2%} [{p['ci'][0]:.1%}, {p['ci'][1]:.1%}]"
        within, on_front = "yes" if p["within_budget"] else "no", "*" if p["name"] in result["front"] else ""
        lines.append(f"{p['name']:<24} {p['verdict']:<12} {acc:<24} {p['ms']:>7.3f}  {within:<6}  {on_front}")
    lines.append(f"budget {result['budget_ms']:g} ms (batch {result['batch']}, {result['threads']} thread(s), "
                 f"{result['where']['cpu_model']}); recommended: {result['recommended']}")  # fmt: skip
    lines.append(result["decision"])
    return "\n".join(lines)


def run_sweep(
    preset: Preset,
    run_dir: Path,
    opts: recipes.RunOptions,
    target: str,
    budget_ms: float,
    latency_runs: int | None = None,
    **plan_settings,
) -> dict:
    """Every step on this machine, in order."""
    names = prepare(preset, run_dir, opts, target, budget_ms, **plan_settings)
    for name in names:
        click.echo(f"[sweep] candidate {name}")
        train_candidate(preset, run_dir, opts, target, name, latency_runs)
    return gather(preset, run_dir, opts, target, latency_runs, names)
