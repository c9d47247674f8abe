"""`kdq report RUN_DIR`: RUN_DIR/report.md and a self-contained RUN_DIR/report.html, with PNG plots in RUN_DIR/plots.

The report computes nothing of its own: every number and every plotted point is read from the JSON files the
run wrote (`<stage>/history.json`, `evaluation_results.json`, `export-*/parity.json` and `manifest.json`),
so what it shows can be checked against them. Sections whose files are missing are listed as such, so a
partial run (say, only a teacher) still gets a report.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch). The HTML is the
Markdown rendered by markdown-it-py (CommonMark with GitHub's tables), with every image inlined.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

import kdq
from kdq.artifacts import MANIFEST, PARITY_JSON
from kdq.diagnose import DIAGNOSIS_JSON, format_diagnosis, plot_diagnosis
from kdq.errors import KdqError
from kdq.files import save_png, save_text
from kdq.parity import certificate_headline, format_report
from kdq.recipes import EVALUATION_JSON
from kdq.train import HISTORY_JSON

REPORT_MD = "report.md"
SWEEP_JSON = "sweep.json"  # `kdq sweep`: every model's accuracy and latency, the front, the choice (kdq.sweep)
REPORT_HTML = "report.html"
PLOTS = "plots"
STAGE_ORDER = ("teacher", "baseline", "student", "student_qat")  # other stages follow, sorted by name
COLORS = {"teacher": "tab:blue", "baseline": "tab:gray", "student": "tab:green", "student_qat": "tab:red",
          "student_qat_pt2e_x86": "tab:purple", "student_qat_pt2e_xnnpack": "tab:pink"}  # fmt: skip


class ReportError(KdqError):
    """The folder holds nothing to report on."""


@dataclass
class Export:
    name: str  # folder name, e.g. "export-x86"
    parity: dict
    manifest: dict | None
    diagnosis: dict | None = None  # `kdq diagnose` (written by itself into a rejected export)


@dataclass
class Run:
    """Everything the report shows, as read from the run directory's JSON files."""

    path: Path
    histories: dict[str, list[dict]] = field(default_factory=dict)  # stage -> history.json
    evaluation: dict[str, dict] = field(default_factory=dict)  # evaluation_results.json
    exports: list[Export] = field(default_factory=list)
    sweep: dict | None = None  # sweep.json

    @property
    def int8_stage(self) -> str | None:
        """The final int8 model: the exported one, else the QAT student, else a PTQ model that was evaluated."""
        for e in self.exports:
            stage = (e.manifest or {}).get("source", {}).get("stage")
            if stage in self.evaluation:
                return stage
        if "student_qat" in self.evaluation:
            return "student_qat"
        return next((s for s in self.evaluation if s.endswith(("_qat", "_ptq"))), None)


def _stage_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    run = Run(run_dir)
    for path in sorted(run_dir.glob(f"*/{HISTORY_JSON}"), key=lambda p: _stage_key(p.parent.name)):
        run.histories[path.parent.name] = json.loads(path.read_text())
    if (run_dir / EVALUATION_JSON).is_file():
        run.evaluation = json.loads((run_dir / EVALUATION_JSON).read_text())
    for parity in sorted(run_dir.glob(f"export-*/{PARITY_JSON}")):
        manifest, diagnosis = parity.parent / MANIFEST, parity.parent / DIAGNOSIS_JSON
        run.exports.append(
            Export(
                parity.parent.name,
                json.loads(parity.read_text()),
                json.loads(manifest.read_text()) if manifest.is_file() else None,
                json.loads(diagnosis.read_text()) if diagnosis.is_file() else None,
            )
        )
    if (run_dir / SWEEP_JSON).is_file():
        run.sweep = json.loads((run_dir / SWEEP_JSON).read_text())
    if not (run.histories or run.evaluation or run.exports or run.sweep):
        raise ReportError(
            f"{run_dir}: nothing to report (no <stage>/{HISTORY_JSON}, {EVALUATION_JSON} or export-*/{PARITY_JSON}); "
            "give the folder `kdq pipeline --run-dir` wrote"
        )
    return run


# --- plots: each returns a Figure built only from the JSON it is given --------------------------------


def plot_training_curves(histories: dict[str, list[dict]]) -> Figure:
    """Per epoch: training loss, and validation (solid) / training (dashed) accuracy, one colour per stage."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for stage, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        color = COLORS.get(stage)
        loss_ax.plot(epochs, [h["train_loss"] for h in hist], marker="o", ms=3, color=color, label=stage)
        if all("val_acc" in h for h in hist):  # none with --val-fraction 0
            acc_ax.plot(epochs, [h["val_acc"] for h in hist], marker="o", ms=3, color=color, label=f"{stage} val")
        acc_ax.plot(epochs, [h["train_acc"] for h in hist], ls="--", color=color, alpha=0.6, label=f"{stage} train")
    loss_ax.set(title="training loss (KD stages: soft + hard)", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="top-1", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _log_axis_if_wide(ax, values: list[float]) -> None:
    """Log scale when the values span more than a decade, with plain number labels either way."""
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_tradeoff(evaluation: dict[str, dict]) -> Figure:
    """Accuracy against size and against batch-1 latency: the evaluation table as a picture."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    size_ax, lat_ax = fig.subplots(1, 2, sharey=True)
    biggest = max(r["size_bytes"] for r in evaluation.values())
    for stage, r in evaluation.items():
        mb, ms, acc = r["size_bytes"] / 1e6, r["latency_ms_b1"], r["top1"]
        color = COLORS.get(stage, "tab:purple")
        size_ax.scatter(mb, acc, s=60, color=color, label=stage)
        lat_ax.scatter(ms, acc, s=40 + 400 * r["size_bytes"] / biggest, color=color, alpha=0.7, label=stage)
        size_ax.annotate(f"{stage}\n{mb:.2f} MB", (mb, acc), textcoords="offset points", xytext=(6, -4), fontsize=8)
        lat_ax.annotate(f"{stage}\n{ms:.2f} ms", (ms, acc), textcoords="offset points", xytext=(8, -4), fontsize=8)
    size_ax.set(title="accuracy vs size", xlabel="weights size (MB)", ylabel="test top-1")
    lat_ax.set(title="accuracy vs CPU latency (bubble area ~ size)", xlabel="batch-1 CPU ms")
    _log_axis_if_wide(size_ax, [r["size_bytes"] / 1e6 for r in evaluation.values()])
    _log_axis_if_wide(lat_ax, [r["latency_ms_b1"] for r in evaluation.values()])
    for ax in (size_ax, lat_ax):
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.25, y=0.15)
    size_ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_front(sweep: dict) -> Figure:
    """Accuracy (95% interval bars) against measured latency for every model of a sweep: the budget as a line, the
    Pareto front joined, the recommended model ringed."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    styles = {"student": ("o", "tab:green"), "teacher_int8": ("s", "tab:red"), "teacher_fp32": ("D", "tab:blue")}
    for p in sweep["points"]:
        marker, color = styles[p["kind"]]
        ok = p["verdict"] in ("certified", "float")
        err = [[p["top1"] - p["ci"][0]], [p["ci"][1] - p["top1"]]]
        ax.errorbar(p["ms"], p["top1"], yerr=err, fmt=marker, color=color, mfc=color if ok else "white", capsize=3)
        ax.annotate(p["name"] + ("" if ok else f" ({p['verdict']})"), (p["ms"], p["top1"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
        if p["name"] == sweep["recommended"]:
            ax.scatter(p["ms"], p["top1"], s=260, facecolors="none", edgecolors="black", linewidths=1.5)
    front = sorted((p for p in sweep["points"] if p["name"] in sweep["front"]), key=lambda p: p["ms"])
    ax.plot([p["ms"] for p in front], [p["top1"] for p in front], "--", color="gray", lw=1, label="Pareto front")
    ax.axvline(sweep["budget_ms"], color="tab:orange", lw=1.5, label=f"budget {sweep['budget_ms']:g} ms")
    _log_axis_if_wide(ax, [p["ms"] for p in sweep["points"]])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set(title=f"accuracy vs latency (ONNX Runtime, batch {sweep['batch']}, {sweep['threads']} thread(s)); "
           "open marker: not certified", xlabel="ms per batch (median of interleaved rounds)",
           ylabel="test top-1 (95% interval)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def sweep_section(sweep: dict, plot: str) -> list[str]:
    """The sweep's table (fastest first), its plot and its decision, as read from sweep.json."""
    rows = [[p["name"], p["verdict"], f"{_pct(p['top1'])} [{_pct(p['ci'][0])}, {_pct(p['ci'][1])}]",
             f"{p['ms']:.3f}", "yes" if p["within_budget"] else "no", "yes" if p["name"] in sweep["front"] else "",
             "**recommended**" if p["name"] == sweep["recommended"] else ""]
            for p in sorted(sweep["points"], key=lambda p: p["ms"])]  # fmt: skip
    header = ["model", "certificate", "test top-1 [95% CI]", "ms", "within budget", "on the front", ""]
    lines = [f"## Students for a {sweep['budget_ms']:g} ms budget (`kdq sweep`)", ""]
    lines += [f"**{sweep['decision']}**", "", f"![accuracy vs latency]({plot})", ""] + _table(header, rows)
    lines += ["", f"Measured on {sweep['where']['cpu_model']} ({sweep['target']} target). {sweep['method']}.", ""]
    return lines


def plot_per_class(per_class: dict[str, float], stage: str, reference: dict[str, float] | None = None) -> Figure:
    """Per-class accuracy of the int8 model (bars), with the float student's as markers when known."""
    classes = list(per_class)
    fig = Figure(figsize=(max(6, 0.6 * len(classes) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(classes)), [per_class[c] for c in classes], color=COLORS.get(stage, "tab:red"), label=stage)
    if reference:
        ax.scatter(
            range(len(classes)),
            [reference[c] for c in classes],
            color="k",
            marker="_",
            s=300,
            zorder=3,
            label="student (fp32)",
        )
    ax.set_xticks(range(len(classes)), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
    ax.set(title=f"per-class accuracy: {stage}", ylabel="accuracy", ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
    fig.legend(fontsize=8, loc="outside right upper")
    return fig


def plot_confusion(matrix: list[list[int]], classes: list[str], stage: str) -> Figure:
    """Counts (true rows, predicted columns), coloured by the fraction of the true class."""
    n = len(classes)
    fig = Figure(figsize=(max(5, 0.55 * n + 2), max(4.5, 0.5 * n + 1.5)), layout="constrained")
    ax = fig.subplots()
    rates = [[v / max(sum(row), 1) for v in row] for row in matrix]
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if rates[i][j] > 0.5 else "k")
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(title=f"confusion matrix: {stage}", xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    return fig


def plot_export_latency(parity: dict, name: str) -> Figure:
    """Median latency per runtime and precision, one panel per batch size, one bar per thread count."""
    rows = parity["latency"]
    batches = sorted({r["batch"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    keys = list(dict.fromkeys((r["runtime"], r["precision"]) for r in rows))
    fig = Figure(figsize=(5.5 * len(batches), 3.8), layout="constrained")
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    width = 0.8 / len(threads)
    for ax, batch in zip(axes, batches, strict=True):
        ms = {(r["runtime"], r["precision"], r["threads"]): r["ms"] for r in rows if r["batch"] == batch}
        for t_i, t in enumerate(threads):
            xs = [i + (t_i - (len(threads) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, [ms.get((*k, t), 0.0) for k in keys], width, label=f"{t} thread{'s' * (t > 1)}")
        ax.set_xticks(range(len(keys)), [f"{r}\n{p}" for r, p in keys], fontsize=8)
        ax.set(title=f"{name}: batch {batch}", ylabel="median ms (log)", yscale="log")
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=8)
    return fig


# --- Markdown -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _pct(x: float) -> str:
    return f"{x:.2%}"


def models_table(evaluation: dict[str, dict]) -> list[str]:
    """The seed's performance table, with ratios to the teacher (when there is one) measured in the same run."""
    ref = evaluation.get("teacher")
    header = ["model", "arch", "params", "size MB", "test top-1", "CPU ms (b1)", "img/s (b64)"]
    if ref:
        header += ["× smaller", "× faster (b1)"]
    taught = any(r.get("taught_by") for r in evaluation.values())
    if taught:
        header.append("taught by")
    by_sha = {r.get("sha256"): stage for stage, r in evaluation.items()}
    rows = []
    for stage, r in evaluation.items():
        row = [
            stage,
            r["arch"],
            f"{r['parameters']:,}",
            f"{r['size_bytes'] / 1e6:.3f}",
            _pct(r["top1"]),
            f"{r['latency_ms_b1']:.3f}",
            f"{r['throughput_img_s_b64']:.0f}",
        ]
        if ref:
            row += [f"{ref['size_bytes'] / r['size_bytes']:.1f}", f"{ref['latency_ms_b1'] / r['latency_ms_b1']:.1f}"]
        if taught:  # the teacher file whose soft targets it learned from: this run's teacher, or which one
            sha = r.get("taught_by")
            row.append("" if not sha else by_sha.get(sha) or f"another teacher ({sha[:12]})")
        rows.append(row)
    return _table(header, rows)


def training_table(histories: dict[str, list[dict]]) -> list[str]:
    """Per stage: the last epoch's training numbers and the epoch kept (best validation accuracy; with
    --val-fraction 0, the last one)."""
    rows = []
    for stage, hist in histories.items():
        last = hist[-1]
        validated = all("val_acc" in h for h in hist)
        kept = max(hist, key=lambda h: h["val_acc"]) if validated else last  # the first of equals, as training
        rows.append(
            [
                stage,
                str(last["epoch"]),
                f"{last['train_loss']:.4f}",
                _pct(last["train_acc"]),
                _pct(last["val_acc"]) if validated else "—",
                f"{kept['epoch']}" + (f" ({_pct(kept['val_acc'])})" if validated else " (last)"),
                f"{sum(h['epoch_seconds'] for h in hist):.1f}",
                f"{last['images_per_second']:.0f}",
            ]
        )
    header = [
        "stage",
        "epochs",
        "final train loss",
        "final train acc",
        "final val acc",
        "epoch kept (val acc)",
        "train s",
        "img/s (last epoch)",
    ]
    return _table(header, rows)


def teacher_lead(histories: dict[str, list[dict]]) -> dict | None:
    """The teacher's and the no-KD baseline's best validation accuracy, and the teacher's lead over the baseline.

    A teacher that is not ahead of the student trained without it has nothing to teach (on a 5,000-image
    dataset a ResNet-18 teacher 3.5 pt behind the baseline gave a KD student 3 pt *below* the baseline).
    None unless both stages have validation accuracies.
    """
    best = {}
    for stage in ("teacher", "baseline"):
        hist = histories.get(stage) or []
        if not hist or not all("val_acc" in h for h in hist):
            return None
        best[stage] = max(h["val_acc"] for h in hist)
    return {**best, "lead": best["teacher"] - best["baseline"], "ahead": best["teacher"] > best["baseline"]}


def teacher_lead_sentence(lead: dict) -> str:
    numbers = f"teacher {_pct(lead['teacher'])}, no-KD baseline {_pct(lead['baseline'])} (best validation accuracy)"
    if lead["ahead"]:
        return f"Teacher vs baseline: {numbers}; the teacher is ahead by {lead['lead'] * 100:.2f} pt."
    return (
        f"**Teacher vs baseline: the teacher is NOT ahead** ({numbers}): distillation from it cannot be expected to "
        "beat the baseline. Train the teacher longer, or pick a larger one."
    )


def build_markdown(run: Run, plots: dict[str, str]) -> str:
    """The report as Markdown; `plots` maps a plot's key to its path relative to the report."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# kdq run report: {run.path.name}",
        "",
        f"Run directory `{run.path}`, report written {now} by kdq {kdq.__version__}. Every number and plotted "
        f"point below is read from the run's JSON files (`<stage>/{HISTORY_JSON}`, `{EVALUATION_JSON}`, "
        f"`export-*/{PARITY_JSON}`).",
        "",
    ]
    for e in run.exports:  # a certificate that did not certify goes on top: the failed gates, and where to look
        if e.parity.get("verdict", "certified" if e.parity["passed"] else "rejected") != "certified":
            lines += [f"> **{e.name}: {certificate_headline(e.parity)}**", ">"]
            lines += [f"> - {c['name']}: {c.get('verdict', 'fail')} ({c.get('reason') or 'see the certificate below'})"
                      for c in e.parity["checks"] if not c["passed"]]  # fmt: skip
            lines.append("")

    if run.sweep:
        lines += sweep_section(run.sweep, plots["front"])
    lines += ["## Models: accuracy, size, latency", ""]
    if run.evaluation:
        lines += models_table(run.evaluation)
        lines += [
            "",
            "Size: serialized weights (`state_dict`). Latency: PyTorch eager on this CPU, median after warm-up; "
            "int8 rows run the converted model, whose params count only its float parameters (packed int8 "
            "weights are not `nn.Parameter`s).",
            "",
            f"![accuracy vs size vs latency]({plots['tradeoff']})",
            "",
        ]
    else:
        lines += [f"_No {EVALUATION_JSON} in the run: `kdq evaluate RUN/*/checkpoint.pt` writes it._", ""]

    lines += ["## Training", ""]
    if run.histories:
        lines += [f"![training curves]({plots['training']})", ""] + training_table(run.histories) + [""]
        lead = teacher_lead(run.histories)
        if lead is not None:
            lines += [teacher_lead_sentence(lead), ""]
    else:
        lines += [f"_No `<stage>/{HISTORY_JSON}` in the run._", ""]

    stage = run.int8_stage
    lines += [f"## Final int8 model: {stage or 'none'}", ""]
    if stage:
        r = run.evaluation[stage]
        lines += [
            f"Test top-1 **{_pct(r['top1'])}** ({r['arch']}, {r['size_bytes'] / 1e6:.3f} MB, "
            f"{r['latency_ms_b1']:.3f} ms at batch 1).",
            "",
            f"![per-class accuracy]({plots['per_class']})",
            "",
            f"![confusion matrix]({plots['confusion']})",
            "",
        ]
        ref = run.evaluation.get("student", {}).get("per_class")
        header = ["class", f"{stage} accuracy"] + (["student (fp32) accuracy"] if ref else [])
        rows = [[c, _pct(a)] + ([_pct(ref[c])] if ref else []) for c, a in r["per_class"].items()]
        lines += _table(header, rows) + ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
        classes = list(r["per_class"])
        matrix = [[c, *map(str, row)] for c, row in zip(classes, r["confusion_matrix"], strict=True)]
        lines += _table(["true \\ predicted", *classes], matrix)
        lines.append("")
    else:
        lines += ["_No quantized model was evaluated: `kdq distill --qat` or `kdq quantize`, then evaluate._", ""]

    lines += ["## Export: parity and latency", ""]
    for e in run.exports:
        certificate = format_report(e.parity).replace("# Parity certificate", f"### {e.name}: parity certificate", 1)
        lines += [f"![{e.name} latency]({plots[e.name]})", "", certificate.strip(), ""]
        if e.diagnosis:
            diagnosis = format_diagnosis(e.diagnosis).replace("# Diagnosis", f"#### {e.name}: diagnosis", 1)
            lines += [diagnosis.strip(), "", f"![{e.name} diagnosis]({plots[e.name + ':diagnosis']})", ""]
    if not run.exports:
        lines += [f"_No `export-*/{PARITY_JSON}` in the run: `kdq export RUN/student_qat/checkpoint.pt`._", ""]
    return "\n".join(lines)


# --- HTML: the Markdown rendered by markdown-it-py (CommonMark + tables), images inlined ----------

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 .2em}"""


def markdown_to_html(markdown: str, base: Path, title: str) -> str:
    """A self-contained page: every image that is a file under `base` becomes a base64 `data:` URI, and raw HTML
    in the Markdown is escaped (a class name from a user's dataset is text, not markup)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def inline_image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        path = base / str(token.attrGet("src"))
        if path.suffix == ".png" and path.is_file():
            token.attrSet("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
        return renderer.image(tokens, idx, options, env)

    md.add_render_rule("image", inline_image)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{md.render(markdown)}</body></html>\n"
    )


# --- the command ----------------------------------------------------------------------------------


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write OUT/report.md, OUT/report.html and OUT/plots/*.png (OUT defaults to the run directory)."""
    run = load_run(run_dir)
    out = Path(out_dir or run_dir)
    plots_dir = out / PLOTS
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, tuple[str, Figure]] = {}
    if run.histories:
        figures["training"] = ("training_curves.png", plot_training_curves(run.histories))
    if run.evaluation:
        figures["tradeoff"] = ("accuracy_size_latency.png", plot_tradeoff(run.evaluation))
    if run.sweep:
        figures["front"] = ("sweep_front.png", plot_front(run.sweep))
    if stage := run.int8_stage:
        r = run.evaluation[stage]
        ref = run.evaluation.get("student", {}).get("per_class")
        figures["per_class"] = ("per_class_accuracy.png", plot_per_class(r["per_class"], stage, ref))
        cm = plot_confusion(r["confusion_matrix"], list(r["per_class"]), stage)
        figures["confusion"] = ("confusion_matrix.png", cm)
    for e in run.exports:
        figures[e.name] = (f"{e.name}_latency.png", plot_export_latency(e.parity, e.name))
        if e.diagnosis:
            figures[f"{e.name}:diagnosis"] = (f"{e.name}_diagnosis.png", plot_diagnosis(e.diagnosis))
    plots = {}
    for key, (name, fig) in figures.items():
        save_png(fig, plots_dir / name)
        plots[key] = f"{PLOTS}/{name}"
    for stale in set(plots_dir.glob("*.png")) - {plots_dir / name for name, _ in figures.values()}:
        stale.unlink()  # from an earlier report of this run (say, of an export since removed)
    markdown = build_markdown(run, plots)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    save_text(markdown, md_path)
    save_text(markdown_to_html(markdown, out, f"kdq run report: {run.path.name}"), html_path)
    return md_path, html_path
