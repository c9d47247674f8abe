"""README's figures trace to committed results files: every generated block equals what its JSON renders to."""

from __future__ import annotations

import copy
import json
import re

import pytest

from bench import readme
from bench.accuracy import paired_rows, summary_rows


def test_readme_blocks_match_the_committed_results():
    assert readme.stale_blocks() == []


def test_every_results_file_is_quoted_by_a_readme_block():
    names = {m["name"] for m in readme.BLOCK.finditer(readme.README.read_text())}
    assert names == set(readme.SOURCES)
    for source, _ in readme.SOURCES.values():
        assert (readme.ROOT / source).is_file(), source


def test_a_changed_result_changes_the_readme():
    """Editing a number in the JSON makes the check fail: the README cannot silently keep an old figure."""
    text = readme.README.read_text()
    source = readme.ROOT / readme.SOURCES["fashion-mnist"][0]
    result = json.loads(source.read_text())
    changed = copy.deepcopy(result)
    changed["models"]["teacher"]["top1"] = [0.123456]
    assert "| 12.35 [11.72, 13.01] (1 seed) |" in readme.render("fashion-mnist", changed)  # Wilson, 10,000 images
    assert readme.render("fashion-mnist", changed) != readme.render("fashion-mnist", result)
    block = re.search(r"<!-- bench\.readme: fashion-mnist -->\n(.*?)<!-- /bench\.readme -->", text, re.S)[1]
    assert block == readme.render("fashion-mnist", result)


def _model(top1: list[float], **extra) -> dict:
    return {"arch": "mobilenet_v2", "parameters": 2_236_682, "fp32_bytes": 9_188_427, "top1": top1, **extra}


def test_accuracy_table_pairs_kd_with_the_baseline_of_the_same_seed():
    """KD gain is the mean ± sample std of per-seed differences (not a difference of means); int8 drop is float
    minus int8 of the same model."""
    ort = {"ort_int8_ms": {"b1": 0.5, "b64": 20.0}, "int8_bytes": 2_700_000}
    result = {"models": {
        "teacher": _model([0.90], arch="resnet20"),
        "baseline": _model([0.80, 0.84, 0.82]),
        "kd_offline": _model([0.83, 0.85, 0.86]),   # gains 3, 1, 4 pt
        "kd_online": _model([0.80, 0.84, 0.82]),
        "dist_offline": _model([0.81, 0.83, 0.85]),
        "dist_paper": _model([0.82, 0.84, 0.85]),
        "kd_offline_qat": _model([0.825], float_model="kd_offline", **ort),
        "kd_offline_ptq": _model([0.80], float_model="kd_offline", **ort),
    }}  # fmt: skip
    rows = {r[0]: r for r in summary_rows(result)}
    assert rows["student, no KD (baseline)"][2] == "82.00 [77.03, 86.97] (n=3 seeds)"  # t(2) = 4.303, sd 2 pt
    assert rows["student, Hinton KD offline"][6] == "+2.67 [-1.13, +6.46] pt (n=3): tie"  # paired by seed
    assert rows["student, Hinton KD online"][6] == "+0.00 [+0.00, +0.00] pt (n=3): tie"
    assert rows["teacher"][2] == "90.00 (1 seed)"  # no test-set size: no interval claimed
    paired = {r[0]: r for r in paired_rows(result)}
    assert paired["DIST - Hinton KD (offline)"][1:] == ["-2.00 -2.00 -1.00", "-1.67 [-3.10, -0.23] pt (n=3): worse"]
    assert paired["DIST, paper's weighting - alpha-blend"][1] == "+1.00 +1.00 +0.00"
    assert rows["student int8, QAT-KD (x86)"][7] == "0.50 pt" and rows["student int8, QAT-KD (x86)"][4] == "2.70"
    assert rows["student int8, PTQ of KD student (x86)"][5] == "0.50 / 20.0"


@pytest.mark.parametrize("name", sorted(readme.SOURCES))
def test_each_block_names_its_source_and_machine(name):
    source, _ = readme.SOURCES[name]
    result = json.loads((readme.ROOT / source).read_text())
    text = readme.render(name, result)
    assert f"[{source}]({source})" in text
    if "environment" in result:
        assert result["environment"]["cpu"]["model_name"] in text


def test_the_fashion_mnist_certificate_story_quotes_its_committed_certificates():
    """The prose on the truncated ONNX bias (README, "Two quantization flows") quotes four certificates that sit in
    results/certificates-fashion-mnist/: each figure is the check's value and 95% interval, as those files hold."""
    folder = readme.ROOT / "results" / "certificates-fashion-mnist"

    def check(name: str, gate: str) -> tuple[float, float, float]:
        c = next(c for c in json.loads((folder / f"{name}-parity.json").read_text())["checks"] if c["name"] == gate)
        return 100 * c["value"], 100 * c["ci"][0], 100 * c["ci"][1]

    text = " ".join(readme.README.read_text().split())  # prose lines wrap anywhere
    v, lo, hi = check("x86-eager-truncated-bias", "ort_flip_rate")
    assert f"{v:.2f}% of the images (95% CI {lo:.2f}–{hi:.2f}%" in text
    v, lo, hi = check("x86-eager", "ort_flip_rate")
    assert f"flips {v:.2f}% ({lo:.2f}–{hi:.2f}%)" in text
    v, lo, hi = check("x86-eager", "int8_accuracy_drop[onnxruntime_int8]")
    assert f"int8 {v:.2f} pt below float in ONNX Runtime ({lo:.2f} to {hi:.2f} pt)".replace("-", "−") in text
    v, lo, hi = check("x86-eager-tie-break", "ort_flip_rate")
    assert f"rose to {v:.2f}% ({lo:.2f}–{hi:.2f}%)" in text
    assert f"at {check('x86-pt2e', 'ort_flip_rate')[0]:.2f}% flips" in text


def test_the_int8_paths_prose_is_what_its_committed_table_shows():
    """README's "int8 on every x86 CPU": 8-bit activations fall far (over 5 pt) below on the AVX2 path, 7-bit
    activations or 7-bit weights compute the same on both paths."""
    rows = json.loads((readme.ROOT / "results" / "int8_paths.json").read_text())["rows"]
    text = readme.README.read_text()
    assert "rows `a8w8`" in text and "rows `a7w8`: each AVX2 column equals" in text and "rows `a8w7`" in text
    for row in rows:
        for runtime in ("pytorch", "ort"):
            native, avx2 = row[f"{runtime}_native"], row[f"{runtime}_avx2"]
            assert native - avx2 > 0.05 if row["scheme"] == "a8w8" else native == avx2, (row["mode"], row["scheme"])
