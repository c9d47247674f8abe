"""`kdq plan`: candidates timed in the target's runtime, marked against the budget, written as JSON."""

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from kdq import plan
from kdq.artifacts import load_target
from kdq.cli import main
from kdq.parity import int8_kernels, ort_op_counts


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plan_times_each_candidate_and_marks_the_budget(tmp_path):
    out = tmp_path / "plan.json"
    names = ["resnet8", "mobilenet_v2_x0.35", "mobilenet_v2_hires_x0.35"]
    result = invoke("plan", "--budget-ms", "0.5", "--rounds", "2", "--runs", "3", "--out", out,
                    *(a for n in names for a in ("--candidate", n)))  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    rows = saved["candidates"]
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert [r["int8_ms"] for r in rows] == sorted(r["int8_ms"] for r in rows)  # fastest first
    for r in rows:
        assert len(r["int8_rounds_ms"]) == len(r["fp32_rounds_ms"]) == 2
        assert r["int8_ms"] == pytest.approx(sorted(r["int8_rounds_ms"])[0] / 2 + sorted(r["int8_rounds_ms"])[1] / 2)
        assert r["within_budget"] == (r["int8_ms"] <= 0.5)
        assert r["name"] in result.output
    by_name = {r["name"]: r for r in rows}
    # hires keeps the 24-channel stage at full resolution: ~3.3x the MACs of the fast layout at the same width
    fast, hires = by_name["mobilenet_v2_x0.35"], by_name["mobilenet_v2_hires_x0.35"]
    assert hires["macs"] > 3 * fast["macs"] and hires["parameters"] == fast["parameters"]
    assert by_name["resnet8"]["parameters"] < 1e5
    assert saved["where"]["cpu_model"] and saved["batch"] == 1 and saved["threads"] == 1


@pytest.mark.parametrize("target", ["x86", "x86-pt2e"])
def test_a_resnet_student_runs_int8_kernels_in_both_flows(tmp_path, target):
    """What plan times is what `kdq export` ships: in the eager and the PT2E flow, every convolution of a ResNet
    student is a QLinearConv and every residual add a QLinearAdd in ONNX Runtime; its classifier stays float."""
    model = plan.Candidate("resnet14").build(10, 32)
    path = plan.int8_onnx(model, load_target(target), tmp_path / "int8", 32)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    counts = ort_op_counts(path)
    kernels = int8_kernels(counts)
    assert convs == kernels["QLinearConv"] == 15 and kernels["QLinearAdd"] == 6
    assert counts.get("Gemm") == 1 and "QGemm" not in kernels  # the float classifier


def test_plan_refuses_what_it_cannot_time(tmp_path):
    result = invoke("plan", "--budget-ms", "1", "--target", "mobile", "--out", tmp_path / "p.json")
    assert result.exit_code == 1 and "kdq plan times ONNX Runtime" in result.output
    result = invoke("plan", "--budget-ms", "1", "--candidate", "mobilenet_v3", "--out", tmp_path / "p.json")
    assert (
        result.exit_code == 1 and "unknown candidate 'mobilenet_v3'; choose from: mobilenet_v2_x0.35" in result.output
    )
    result = invoke("plan", "--budget-ms", "0")
    assert result.exit_code == 2 and "--budget-ms" in result.output
    assert not (tmp_path / "p.json").exists()


def test_every_candidate_builds_at_its_width():
    widths = {c.name: c.build(10, 32) for c in plan.STUDENT_FAMILY}
    assert set(widths) == {f"{arch}_x{w}" for arch in ("mobilenet_v2", "mobilenet_v2_hires")
                           for w in ("0.35", "0.5", "0.75", "1")} | {"resnet8", "resnet14", "resnet20"}  # fmt: skip
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in widths.items()}
    assert n["mobilenet_v2_x0.35"] < n["mobilenet_v2_x0.5"] < n["mobilenet_v2_x0.75"] < n["mobilenet_v2_x1"]
    assert n["mobilenet_v2_x1"] == n["mobilenet_v2_hires_x1"]  # same weights, finer maps
    assert torch.no_grad()(widths["resnet8"])(torch.randn(2, 3, 32, 32)).shape == (2, 10)
