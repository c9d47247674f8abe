"""`kdq sweep`: the choice between students and the int8 teacher (on made-up points whose answers are known), and
a real sweep on the smoke recipe: certified, within budget, its front in the report, its numbers re-measurable."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kdq.cli import main
from kdq.sweep import TEACHER_FP32, TEACHER_INT8, decide, pareto_front

N = 2000


def point(name: str, kind: str, right: int, ms: float, verdict: str = "certified", shift: int = 0) -> dict:
    """A model right on `right` of N test images, from image `shift` on, timed at `ms` against a 1 ms budget."""
    correct = "0" * shift + "1" * right + "0" * (N - right - shift)
    return {"name": name, "kind": kind, "verdict": verdict, "top1": right / N, "ms": ms, "within_budget": ms <= 1.0,
            "correct": correct}  # fmt: skip


def teacher(right_int8: int, ms_int8: float, verdict: str = "certified", shift: int = 0) -> list[dict]:
    return [point(TEACHER_INT8, "teacher_int8", right_int8, ms_int8, verdict, shift),
            point(TEACHER_FP32, "teacher_fp32", right_int8 + 10, 2 * ms_int8, "float")]  # fmt: skip


def test_a_student_tied_with_an_int8_teacher_that_fits_the_budget_loses_to_it():
    # the teacher is right on 25 images the student misses, the student on 20 the teacher misses: a tie
    points = [point("s1", "student", 1800, 0.2), point("s2", "student", 1790, 0.1), *teacher(1805, 0.8, shift=20)]
    d = decide(points, "s2")
    assert d["recommended"] == TEACHER_INT8
    assert d["comparisons"]["int8 teacher"]["candidate"] == "s1"  # the most accurate student was the one compared
    assert d["comparisons"]["int8 teacher"]["verdict"] == "tie"
    assert "quantize the teacher" in d["decision"]


def test_a_student_is_chosen_when_it_is_ahead_of_the_int8_teacher_or_the_teacher_misses_the_budget():
    ahead = [point("s1", "student", 1900, 0.2), *teacher(1700, 0.8)]
    assert decide(ahead, "s1")["recommended"] == "s1"
    assert decide(ahead, "s1")["comparisons"]["int8 teacher"]["verdict"] == "ahead"
    slow_teacher = [point("s1", "student", 1700, 0.2), *teacher(1900, 1.5)]  # better, but over the 1 ms budget
    d = decide(slow_teacher, "s1")
    assert d["recommended"] == "s1" and "over the budget" in d["decision"]
    assert d["comparisons"]["int8 teacher"]["verdict"] == "behind"
    assert d["comparisons"]["int8 teacher"]["speedup"] == pytest.approx(1.5 / 0.2)


def test_only_certified_students_within_budget_are_chosen_and_rejected_models_are_off_the_front():
    points = [point("fast-but-rejected", "student", 1990, 0.05, "rejected"), point("over", "student", 1950, 1.2),
              point("ok", "student", 1800, 0.3), *teacher(1600, 0.9, "rejected")]  # fmt: skip
    d = decide(points, "ok")
    assert d["recommended"] == "ok" and "not certified" in d["decision"]
    assert pareto_front(points) == d["front"] == ["ok", "over"]  # the float teacher: slower and worse than "over"
    assert "fast-but-rejected" not in d["front"] and TEACHER_INT8 not in d["front"]
    nothing = decide([point("over", "student", 1950, 1.2), *teacher(1600, 1.5)], "over")
    assert nothing["recommended"] is None and "raise the budget" in nothing["decision"]


def test_the_front_keeps_what_nothing_else_beats_on_both_latency_and_accuracy():
    points = [point("a", "student", 1500, 0.1), point("b", "student", 1400, 0.2), point("c", "student", 1600, 0.3),
              *teacher(1600, 0.5)]  # fmt: skip
    assert pareto_front(points) == ["a", "c", TEACHER_FP32]  # b: slower and worse than a; int8 teacher: as c, slower


def test_a_sweep_on_the_smoke_recipe_certifies_a_model_within_budget_and_reports_its_front(smoke_sweep):
    result = json.loads((smoke_sweep / "sweep.json").read_text())
    by_name = {p["name"]: p for p in result["points"]}
    assert set(by_name) == {"resnet8", TEACHER_INT8, TEACHER_FP32}
    chosen = by_name[result["recommended"]]
    assert chosen["verdict"] == "certified" and chosen["ms"] <= result["budget_ms"] == 0.3
    manifest = json.loads((smoke_sweep / "sweep" / chosen["export"].split("/sweep/")[1] / "manifest.json").read_text())
    assert manifest["budget"]["ms"] == 0.3 and manifest["budget"]["measured_ms"] == chosen["ms"]
    assert manifest["certificate"]["verdict"] == "certified"
    # the sweep's own accuracy of each exported file is the certificate's ONNX Runtime accuracy, image for image
    for name in ("resnet8", TEACHER_INT8):
        parity = json.loads((smoke_sweep / "sweep" / by_name[name]["export"].split("/sweep/")[1] / "parity.json")
                            .read_text())  # fmt: skip
        assert by_name[name]["top1"] == pytest.approx(parity["accuracy"]["onnxruntime_int8"])
        assert by_name[name]["n"] == parity["test_samples"]
    assert by_name[TEACHER_INT8]["arch"] == by_name[TEACHER_FP32]["arch"] == "mobilenet_v2"
    report = (smoke_sweep / "report.md").read_text()
    assert "## Students for a 0.3 ms budget" in report and result["decision"] in report
    assert (smoke_sweep / "plots" / "sweep_front.png").stat().st_size > 10_000


def kdq_sweep(*args: str):
    return CliRunner().invoke(main, ["sweep", "--preset", "smoke", *args])


def test_a_budget_nothing_fits_is_one_line_before_any_training(tmp_path):
    run_dir = tmp_path / "run"
    result = kdq_sweep("--run-dir", str(run_dir), "--budget-ms", "0.0001", "--candidate", "resnet8", "--rounds", "1")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: no candidate within 0.0001 ms on this CPU")
    assert not (run_dir / "teacher").exists()


def test_steps_out_of_order_are_refused_in_one_line(tmp_path):
    refusals = [(("--step", "train"), "run `kdq sweep --step prepare` first"),
                (("--step", "gather"), "run `kdq sweep --step prepare` first"),
                (("--step", "prepare"), "--step prepare needs --budget-ms"),
                (("--step", "gather", "--index", "0"), "--index picks the candidate of --step train")]  # fmt: skip
    for args, message in refusals:
        result = kdq_sweep("--run-dir", str(tmp_path / "run"), *args)
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
