"""`kdq report`: plots are real PNGs, the HTML is self-contained, and every number equals the JSON it comes from."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.parity import SYMBOLS
from kdq.report import PLOTS, load_run, plot_confusion, plot_tradeoff, plot_training_curves, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_RUN_PLOTS = {
    "training_curves.png",
    "accuracy_size_latency.png",
    "per_class_accuracy.png",
    "confusion_matrix.png",
    "export-x86_latency.png",
}


def tables(markdown: str) -> list[tuple[str, list[list[str]]]]:
    """Every pipe table of a Markdown text, in order: (first header cell, rows of cells without the header)."""
    found, lines = [], markdown.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            found.append(([c.strip() for c in line.strip("|").split("|")][0], rows))
    return found


def table(markdown: str, first_header: str, nth: int = 0) -> list[list[str]]:
    return [rows for key, rows in tables(markdown) if key == first_header][nth]


def num(cell: str) -> float:
    """'92.22%' -> 0.9222, '2,236,682' -> 2236682, '93.33% (3)' -> 0.9333, '1.234' -> 1.234."""
    m = re.match(r"^(-?[\d,]+(?:\.\d+)?)(%?)", cell)
    assert m, f"not a number: {cell!r}"
    value = float(m[1].replace(",", ""))
    return value / 100 if m[2] else value


def shown(cell: str, value: float) -> bool:
    """The cell shows `value`, rounded to the cell's own number of decimals."""
    m = re.match(r"^-?[\d,]+(?:\.(\d+))?(%?)", cell)
    decimals = len(m[1] or "") + (2 if m[2] else 0)
    return abs(num(cell) - value) <= 0.5 * 10**-decimals + 1e-9


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 300 and im.height >= 200


@pytest.fixture(scope="module")
def report(smoke_run: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(main, ["report", str(smoke_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(out / "report.md"), str(out / "report.html")]
    return out, (out / "report.md").read_text()


def test_pipeline_ends_by_writing_the_report(smoke_run: Path):
    assert (smoke_run / "report.md").is_file() and (smoke_run / "report.html").is_file()
    assert {p.name for p in (smoke_run / PLOTS).iterdir()} == FULL_RUN_PLOTS
    for name in FULL_RUN_PLOTS:
        assert_png(smoke_run / PLOTS / name)
    # written after everything it reports on
    assert (smoke_run / "report.md").stat().st_mtime >= (smoke_run / "export-x86" / "parity.json").stat().st_mtime


def test_a_rejected_export_still_gets_its_report_with_the_failed_gates_on_top(smoke_run: Path, tmp_path: Path):
    """`kdq pipeline --resume` on a copy of the smoke run, with a target the smoke student cannot meet
    (min_accuracy 99.9%): the export is rejected, and the report is written anyway, the failed gate on top,
    the rejected export's certificate, diagnosis and plots below."""
    from tests.targets import smoke_target

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("export-*", "report.*", PLOTS))
    target = smoke_target("x86", tmp_path, paths=[], min_accuracy=0.999)
    argv = ["pipeline", "--preset", "smoke", "--run-dir", run, "--device", "cpu", "--resume", "--target", target,
            "--latency-runs", "2"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in argv])
    assert result.exit_code == 1 and "parity gates failed: min_accuracy[" in result.output, result.output
    assert f"report: {run / 'report.md'}" in result.output
    md = (run / "report.md").read_text()
    top = md.split("\n## ")[0]
    assert "export-x86.rejected: REJECTED" in top and "- min_accuracy[pytorch_int8]: fail" in top
    assert "### export-x86.rejected: parity certificate" in md and "#### export-x86.rejected: diagnosis" in md
    for plot in ("export-x86.rejected_diagnosis.png", "confusion_matrix.png", "per_class_accuracy.png"):
        assert_png(run / PLOTS / plot)


def test_every_plot_is_a_valid_png_linked_from_the_report(report):
    out, md = report
    linked = re.findall(r"^!\[[^\]]*\]\((.+?)\)$", md, flags=re.M)
    assert {Path(p).name for p in linked} == FULL_RUN_PLOTS
    for p in linked:
        assert_png(out / p)


def test_models_table_equals_evaluation_results(smoke_run, report):
    evaluation = json.loads((smoke_run / "evaluation_results.json").read_text())
    rows = table(report[1], "model")
    assert [r[0] for r in rows] == list(evaluation) == ["teacher", "baseline", "student", "student_qat"]
    teacher = evaluation["teacher"]
    for stage, arch, params, mb, top1, ms, img_s, smaller, faster, taught_by in rows:
        r = evaluation[stage]
        # the KD students learned from this run's teacher file (its sha256), the others from none
        assert taught_by == ("teacher" if stage in ("student", "student_qat") else "")
        assert arch == r["arch"] and num(params) == r["parameters"]
        assert shown(mb, r["size_bytes"] / 1e6) and shown(top1, r["top1"])
        assert shown(ms, r["latency_ms_b1"]) and shown(img_s, r["throughput_img_s_b64"])
        assert shown(smaller, teacher["size_bytes"] / r["size_bytes"])
        assert shown(faster, teacher["latency_ms_b1"] / r["latency_ms_b1"])


def test_training_table_equals_histories(smoke_run, report):
    rows = table(report[1], "stage")
    assert [r[0] for r in rows] == ["teacher", "baseline", "student", "student_qat"]
    for stage, epochs, loss, train_acc, val_acc, kept, seconds, img_s in rows:
        hist = json.loads((smoke_run / stage / "history.json").read_text())
        top = max(hist, key=lambda h: h["val_acc"])
        assert int(epochs) == len(hist) == hist[-1]["epoch"]
        assert shown(loss, hist[-1]["train_loss"]) and shown(train_acc, hist[-1]["train_acc"])
        assert shown(val_acc, hist[-1]["val_acc"])
        assert kept.startswith(f"{top['epoch']} (") and shown(kept.split("(")[1].rstrip(")"), top["val_acc"])
        # the epoch the table says was kept is the one the checkpoint holds
        assert ck.load_checkpoint(smoke_run / stage / "checkpoint.pt")[ck.SELECTED_EPOCH] == top["epoch"]
        assert shown(seconds, sum(h["epoch_seconds"] for h in hist))
        assert shown(img_s, hist[-1]["images_per_second"])


def test_int8_section_equals_the_exported_models_evaluation(smoke_run, report):
    evaluation = json.loads((smoke_run / "evaluation_results.json").read_text())
    manifest = json.loads((smoke_run / "export-x86" / "manifest.json").read_text())
    stage = manifest["source"]["stage"]
    assert stage == "student_qat" and f"## Final int8 model: {stage}" in report[1]
    r, fp32 = evaluation[stage], evaluation["student"]
    per_class = table(report[1], "class")
    assert [row[0] for row in per_class] == list(r["per_class"])
    for cls, acc, ref in per_class:
        assert shown(acc, r["per_class"][cls]) and shown(ref, fp32["per_class"][cls])
    confusion = table(report[1], "true \\ predicted")
    assert [[int(v) for v in row[1:]] for row in confusion] == r["confusion_matrix"]
    assert f"Test top-1 **{r['top1']:.2%}**" in report[1]


def test_export_tables_equal_parity_json(smoke_run, report):
    parity = json.loads((smoke_run / "export-x86" / "parity.json").read_text())
    md = report[1]
    accuracy = {row[0]: row[1] for row in table(md, "runtime")}
    assert set(accuracy) == set(parity["accuracy"])
    assert all(shown(accuracy[k], v) for k, v in parity["accuracy"].items())
    grid = table(md, "runtime", nth=1)  # the latency grid
    assert len(grid) == len(parity["latency"])
    for row, r in zip(grid, parity["latency"], strict=True):
        assert row[:4] == [r["runtime"], r["precision"], str(r["batch"]), str(r["threads"])]
        assert shown(row[4], r["ms"])
    agreement = {row[0]: row for row in table(md, "vs PyTorch int8")}
    for runtime, a in parity["agreement"].items():
        assert agreement[runtime][1].startswith(f"{a['flips']} of {a['n']} ")
        assert shown(agreement[runtime][3], a["max_abs_logit_diff"])
    gates = {row[0]: row for row in table(md, "gate")}
    assert set(gates) == {c["name"] for c in parity["checks"]}
    for c in parity["checks"]:  # every gate's verdict, and a statistical one's N and p-value
        row = gates[c["name"]]
        assert row[6] == SYMBOLS[c["verdict"]] and (row[4] == str(c["n"]) if "n" in c else row[4] == "")
        assert "p" not in c or shown(row[5], c["p"]) or c["p"] < 1e-3


def test_html_is_self_contained_and_shows_the_same_tables(report):
    out, md = report
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "the page must not load anything"
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="[^"]*"', page)
    linked = re.findall(r"^!\[[^\]]*\]\((.+?)\)$", md, flags=re.M)
    assert [base64.b64decode(i) for i in images] == [(out / p).read_bytes() for p in linked]
    assert page.count("<tr>") == sum(len(rows) + 1 for _, rows in tables(md))
    assert page.count("<table>") == len(tables(md)) and "<td>student_qat</td>" in page
    assert re.search(r"<strong>(CERTIFIED|NOT PROVEN|REJECTED)[^<]*</strong>", page)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by `make setup`


def test_report_renders_in_a_real_browser(report, tmp_path):
    """Headless Chromium opens report.html: every table is laid out, every plot decodes and is drawn at a real
    size, and the screenshot is a page, not a blank one."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium (as root)")
    from playwright.sync_api import sync_playwright

    out, md = report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "[...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,"
            " width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height}))"
        )
        shown_tables = page.evaluate(
            "[...document.querySelectorAll('table')].map(t => ({rows: t.rows.length,"
            " height: t.getBoundingClientRect().height, text: t.rows[0].cells[0].innerText.trim()}))"
        )
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    linked = re.findall(r"^!\[([^\]]*)\]\((.+?)\)$", md, flags=re.M)
    assert [i["alt"] for i in images] == [alt for alt, _ in linked] and len(images) >= len(FULL_RUN_PLOTS)
    broken = [i["alt"] for i in images if not i["ok"] or i["width"] < 300 or i["height"] < 150]
    assert not broken, f"plots not rendered: {broken}"
    assert [(t["text"], t["rows"]) for t in shown_tables] == [(key, len(rows) + 1) for key, rows in tables(md)]
    assert all(t["height"] > 20 * t["rows"] for t in shown_tables)
    with Image.open(shot) as im:
        gray = im.convert("L")
        assert im.height > 2000  # the whole page: tables and plots, not one screen
        assert gray.getextrema()[0] < 64 and len(gray.getcolors(256) or []) > 50  # text and plots, not blank


# --- without a pipeline run: plots and partial runs --------------------------------------------------


def history(epochs: int, start: float) -> list[dict]:
    return [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 2.0 / e,
            "train_soft_loss": 0.0,
            "train_hard_loss": 2.0 / e,
            "train_acc": start + 0.1 * e,
            "val_acc": start + 0.08 * e,
            "epoch_seconds": 1.5,
            "images_per_second": 900.0,
        }
        for e in range(1, epochs + 1)
    ]


def test_plots_draw_exactly_the_json_values():
    histories = {"teacher": history(3, 0.5), "student": history(2, 0.3)}
    fig = plot_training_curves(histories)
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in loss_ax.lines + acc_ax.lines}
    for stage, hist in histories.items():
        assert lines[stage] == [h["train_loss"] for h in hist]
        assert lines[f"{stage} val"] == [h["val_acc"] for h in hist]
        assert lines[f"{stage} train"] == [h["train_acc"] for h in hist]

    matrix = [[5, 1], [2, 7]]
    texts = [t.get_text() for t in plot_confusion(matrix, ["a", "b"], "student_qat").axes[0].texts]
    assert texts == ["5", "1", "2", "7"]

    evaluation = {
        "teacher": {"size_bytes": 9_000_000, "latency_ms_b1": 12.0, "top1": 0.95},
        "student_qat": {"size_bytes": 2_700_000, "latency_ms_b1": 0.5, "top1": 0.91},
    }
    size_ax, lat_ax = plot_tradeoff(evaluation).axes
    assert [tuple(c.get_offsets()[0]) for c in size_ax.collections] == [(9.0, 0.95), (2.7, 0.91)]
    assert [tuple(c.get_offsets()[0]) for c in lat_ax.collections] == [(12.0, 0.95), (0.5, 0.91)]
    assert lat_ax.get_xscale() == "log"  # 24x range


def test_partial_run_reports_what_it_has(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "history.json").write_text(json.dumps(history(3, 0.5)))
    (tmp_path / PLOTS).mkdir()
    (tmp_path / PLOTS / "export-x86_latency.png").write_bytes(PNG_MAGIC)  # from an earlier report: removed
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text()
    assert [p.name for p in (tmp_path / PLOTS).iterdir()] == ["training_curves.png"]
    assert_png(tmp_path / PLOTS / "training_curves.png")
    assert "_No evaluation_results.json in the run" in md
    assert "## Final int8 model: none" in md and "No `export-*/parity.json` in the run" in md
    assert [r[0] for r in table(md, "stage")] == ["teacher"]
    assert html_path.is_file() and load_run(tmp_path).int8_stage is None


def test_folder_without_a_run_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to report" in result.output
    assert result.output.count("\n") == 1 and not list(tmp_path.iterdir())


def test_report_states_whether_the_teacher_is_ahead_of_the_baseline(smoke_run, report):
    """The smoke run's teacher and baseline, from their histories: the sentence gives both best val accuracies."""
    best = {s: max(h["val_acc"] for h in json.loads((smoke_run / s / "history.json").read_text()))
            for s in ("teacher", "baseline")}  # fmt: skip
    line = next(line for line in report[1].splitlines() if "Teacher vs baseline" in line)
    assert f"teacher {best['teacher']:.2%}" in line and f"baseline {best['baseline']:.2%}" in line
    assert ("NOT ahead" in line) == (best["teacher"] <= best["baseline"])


def _fake_stage_histories(run: Path, teacher: float, baseline: float) -> None:
    for stage, start in (("teacher", teacher), ("baseline", baseline)):
        (run / stage).mkdir(parents=True, exist_ok=True)
        (run / stage / "history.json").write_text(json.dumps(history(3, start)))


def test_pipeline_warns_loudly_or_stops_when_the_teacher_is_not_ahead(tmp_path, monkeypatch, capsys):
    """A teacher behind the baseline: a banner on stderr (and the run goes on), or with the flag an error before
    the KD student trains; the report then says NOT ahead."""
    from kdq import pipeline, recipes
    from kdq.pipeline import TeacherNotAheadError, run_pipeline
    from kdq.presets import get_preset

    trained = []

    def fake_train(preset, run_dir, opts, stage="teacher", **kwargs):
        trained.append(stage)
        if stage == "baseline":  # best val: teacher 76%, baseline 86%
            _fake_stage_histories(run_dir, 0.52, 0.62)
        if stage == "student":  # far enough: the check comes before it
            raise RuntimeError("distilling")
        return run_dir / stage / "checkpoint.pt"

    monkeypatch.setattr(recipes, "train_teacher", fake_train)
    monkeypatch.setattr(recipes, "train_student", fake_train)
    opts = recipes.RunOptions()
    with pytest.raises(TeacherNotAheadError, match=r"teacher 76.00% is not ahead of the no-KD baseline 86.00%"):
        run_pipeline(get_preset("smoke"), tmp_path, opts, require_teacher_ahead=True)
    assert trained == ["teacher", "baseline"]
    with pytest.raises(RuntimeError, match="distilling"):
        run_pipeline(get_preset("smoke"), tmp_path, opts)
    assert (
        trained[-1] == "student" and "WARNING Teacher vs baseline: the teacher is NOT ahead" in capsys.readouterr().err
    )
    _fake_stage_histories(tmp_path, 0.62, 0.52)
    assert pipeline.check_teacher_ahead(tmp_path, required=True)["lead"] == pytest.approx(0.10)


def test_distill_can_require_the_teacher_ahead_as_the_torchx_pipeline_job_does(tmp_path):
    import components

    _fake_stage_histories(tmp_path, 0.52, 0.62)
    argv = ["distill", "--preset", "smoke", "--run-dir", str(tmp_path), "--require-teacher-ahead"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1 and "is not ahead of the no-KD baseline" in result.output
    assert not (tmp_path / "student").exists()
    args = components.pipeline(require_teacher_ahead=True).roles[0].args  # the job is `kdq pipeline` itself
    assert args[0] == "pipeline" and args.count("--require-teacher-ahead") == 1
