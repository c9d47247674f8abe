"""`kdq diagnose` names the layer an int8 model's error comes from, on validation images only, and
`kdq quantize --max-drop` repairs it by computing that layer in float."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.diagnose import DIAGNOSIS_JSON, DIAGNOSIS_PNG

BROKEN = "features.4.conv.1.0"  # a depthwise convolution in the middle of the network


def scrambled(smoke_run: Path, out: Path) -> Path:
    """The smoke QAT student with one convolution's calibrated output range shrunk 20x (its scale with it)."""
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    key = f"{BROKEN}.activation_post_process.activation_post_process.max_val"
    ckpt[ck.MODEL][key] = ckpt[ck.MODEL][key] * 0.05
    ck.save_checkpoint(ckpt, out)
    return out


def test_a_layer_with_a_scrambled_scale_is_named_first(smoke_run: Path, tmp_path: Path):
    """The diagnosis ranks the scrambled layer first, by the SQNR that computing it in float gains, and writes a
    table, JSON and a plot."""
    broken = scrambled(smoke_run, tmp_path / "broken.pt")
    result = CliRunner().invoke(main, ["diagnose", str(broken), "--samples", "64", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "d" / DIAGNOSIS_JSON).read_text())
    assert d["split"] == "validation" and d["samples"] == 64
    first, second = d["sensitivity"][:2]
    assert first["layer"] == BROKEN and first["gain_db"] > 2 * max(second["gain_db"], 0.1), d["sensitivity"][:3]
    assert f"| {BROKEN} |" in result.output.split("\n| layer computed in float")[1].splitlines()[2]
    assert (tmp_path / "d" / DIAGNOSIS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_certified_export_is_diagnosed_from_its_folder(smoke_run: Path, tmp_path: Path):
    """From an export folder: its checkpoint (sha256-checked) and ONNX file; every convolution compared in LSB."""
    result = CliRunner().invoke(
        main, ["diagnose", str(smoke_run / "export-x86"), "--samples", "32", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / DIAGNOSIS_JSON).read_text())
    rows = d["divergence"]
    assert len(rows) == 52 and rows[0]["layer"] == "features.0.0"
    assert sum(r["added_mean_lsb"] for r in rows) == pytest.approx(rows[-1]["mean_lsb"])
    first = next((r["layer"] for r in rows if r["max_lsb"] > 1), None)
    assert d["first_divergent_layer"] == first


def test_requantization_multiplier_is_input_times_weight_over_output_scale():
    """A channel whose weight step is 40x another's: input scale 0.5, weight scales 0.1 and 4.0, output scale 1.0
    give multipliers 0.05 and 2.0 (worked by hand): one accumulator unit of the second is 2 output LSB."""
    import torch

    from kdq.diagnose import requantization_multipliers

    conv = torch.ao.nn.quantized.Conv2d(1, 2, 1)
    w = torch.quantize_per_channel(torch.ones(2, 1, 1, 1), torch.tensor([0.1, 4.0]), torch.tensor([0, 0]), 0,
                                   torch.qint8)  # fmt: skip
    conv.set_weight_bias(w, None)
    conv.scale = 1.0
    assert requantization_multipliers(conv, 0.5).tolist() == pytest.approx([0.05, 2.0])


def test_a_diagnosis_from_an_older_kdq_still_renders():
    """The report reads every diagnosis.json it finds; one written before the multiplier column renders with a dash."""
    from kdq.diagnose import format_diagnosis

    summary = {"sqnr_db": 30.0, "agreement": 0.99, "accuracy_int8": 0.9, "accuracy_float": 0.9}
    row = {"layer": "features.0.0", "max_lsb": 1, "beyond_1_lsb": 0.0, "mean_lsb": 0.0, "added_mean_lsb": 0.0}
    old = {"samples": 8, "split": "validation", "summary": summary, "sensitivity": [], "divergence": [row]}
    assert "| features.0.0 | 1 | 0.00% | 0.000 | +0.000 | — |" in format_diagnosis(old)


def test_max_drop_repairs_the_scrambled_layer_and_the_repair_is_certified(smoke_run: Path, tmp_path: Path):
    """`kdq quantize --max-drop` computes layers in float in the diagnosis's order, the scrambled one first, until
    int8 is within a point of float on validation images (142: one image is 0.7 pt). The export of the repaired
    checkpoint is certified, its manifest names the float layers, and the kernel gate finds exactly those
    convolutions in float in ONNX Runtime, every other one a QLinearConv."""
    from kdq.artifacts import MANIFEST
    from tests.targets import smoke_target

    broken, repaired = scrambled(smoke_run, tmp_path / "broken.pt"), tmp_path / "repaired.pt"
    result = CliRunner().invoke(main, ["quantize", str(broken), "--max-drop", "1", "--out", str(repaired)])
    assert result.exit_code == 0, result.output
    q = ck.load_checkpoint(repaired)["quantization"]
    steps, floats = q["repair"]["steps"], list(q["float_layers"])
    assert floats[0] == BROKEN and steps[-1]["float_layers"] == floats
    assert q["repair"]["float_accuracy"] - steps[0]["accuracy"] > 0.1  # the scramble cost > 10 pt ...
    assert q["repair"]["float_accuracy"] - steps[-1]["accuracy"] <= 0.01  # ... the repair is within budget
    export = tmp_path / "export"
    target = smoke_target("x86", tmp_path, paths=[])
    result = CliRunner().invoke(main, ["export", str(repaired), "--target", str(target), "--out", str(export)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((export / MANIFEST).read_text())
    assert (
        manifest["certificate"]["verdict"] == "certified" and list(manifest["quantization"]["float_layers"]) == floats
    )
    kernels = json.loads((export / "parity.json").read_text())["ort_kernels"]
    assert kernels["float_convs"] == len(floats) and kernels["int8"]["QLinearConv"] == kernels[
        "model_convs"
    ] == 52 - len(floats)


def test_max_drop_refuses_what_it_cannot_repair(smoke_run: Path, tmp_path: Path):
    """A float checkpoint has no int8 layer to put back in float (`kdq quantize` quantizes it first)."""
    from kdq.repair import RepairError, repair

    with pytest.raises(RepairError, match="eager-flow int8 checkpoints"):
        repair(smoke_run / "student" / "checkpoint.pt", tmp_path / "out.pt", 0.01)
