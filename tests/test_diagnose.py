"""`kdq diagnose` names the layer an int8 model's error comes from, on validation images only."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq.cli import main
from kdq.diagnose import DIAGNOSIS_JSON, DIAGNOSIS_PNG

BROKEN = "features.6.conv.1.0"  # a depthwise convolution in the middle of the network


def test_a_layer_with_a_scrambled_scale_is_named_first(smoke_run: Path, tmp_path: Path):
    """Shrink one convolution's calibrated output range 20x (its quantization scale with it): the diagnosis ranks
    it first, by the SQNR that leaving it in float gains, and writes a table, JSON and a plot."""
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    key = f"{BROKEN}.activation_post_process.activation_post_process.max_val"
    ckpt[ck.MODEL][key] = ckpt[ck.MODEL][key] * 0.05
    broken = tmp_path / "broken.pt"
    ck.save_checkpoint(ckpt, broken)
    result = CliRunner().invoke(main, ["diagnose", str(broken), "--samples", "64", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "d" / DIAGNOSIS_JSON).read_text())
    assert d["split"] == "validation" and d["samples"] == 64
    first, second = d["sensitivity"][:2]
    assert first["layer"] == BROKEN and first["gain_db"] > 2 * max(second["gain_db"], 0.1), d["sensitivity"][:3]
    assert f"| {BROKEN} |" in result.output.split("\n| layer left in float")[1].splitlines()[2]
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
