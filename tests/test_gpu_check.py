"""`make gpu-check` runs before a GPU is lent: the same script on the CPU (`--device cpu --tiny`), every check
through kdq's own code paths, with a JSON of what ran. On a GPU the CUDA paths run instead (not in CI)."""

import dataclasses
import json

import torch

from bench import gpu_check
from kdq.presets import get_preset, load_recipe, recipe_toml
from tests.launch_support import need_debian_fashion_mnist


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path, capsys):
    need_debian_fashion_mnist()
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-check-latest.json").read_text())
    checks = result["checks"]
    assert list(checks) == list(gpu_check.CHECKS)
    assert {n for n, c in checks.items() if c["status"] == "ok"} == set(gpu_check.CHECKS) - {"preset_epoch"}
    assert checks["preset_epoch"]["status"] == "skipped"
    assert checks["bf16_channels_last"]["images_per_second"] > 0 and checks["bf16_channels_last"]["epoch"] == 1
    assert checks["sync_batchnorm"]["batchnorm_classes"] == ["_CpuSyncBatchNorm"]
    assert checks["sync_batchnorm"]["max_output_diff"] <= 1e-4
    assert checks["streaming"]["batches"] == 1_000 // 256
    assert checks["pt2e_qat"]["stages"] == ["student_qat_pt2e_x86"]
    assert result["device"] == "cpu" and result["environment"]["cpu"]["logical_cpus"] >= 1


def test_a_failed_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise ValueError("no such kernel")

    monkeypatch.setitem(gpu_check.CHECKS, "streaming", broken)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "streaming", "sync_batchnorm",
                           "--out-dir", str(tmp_path)]) == 1  # fmt: skip
    checks = json.loads((tmp_path / "gpu-check-latest.json").read_text())["checks"]
    assert checks["streaming"]["status"] == "failed" and checks["streaming"]["error"] == "ValueError: no such kernel"
    assert checks["sync_batchnorm"]["status"] == "ok"


def test_no_cuda_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_full_cuts_every_stages_epochs_to_fit_its_budget_at_the_measured_speed(tmp_path):
    preset = get_preset("fashion-mnist")
    assert gpu_check.full_recipe(0.01, 600) == dataclasses.replace(preset, name="fashion-mnist-gpu-full")
    cut = gpu_check.full_recipe(13.0, 600)  # the H200's seconds per epoch (results/gpu-check-h200.json)
    stages = [cut.teacher_optim, cut.student_optim, cut.student_optim, cut.quant.qat_optim]
    assert [o.epochs for o in stages] == [9, 9, 9, 1]
    assert sum(o.epochs for o in stages) * 13.0 <= gpu_check.FULL_TRAINING_SHARE * 600 + 13.0  # rounding: one epoch
    (tmp_path / "full.toml").write_text(recipe_toml(cut))
    assert load_recipe(tmp_path / "full.toml") == cut  # what `kdq pipeline --recipe` runs is what was sized


def test_full_is_skipped_without_a_measured_epoch(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "sync_batchnorm", "--full",
                           "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    full = json.loads((tmp_path / "gpu-check-latest.json").read_text())["checks"]["full_pipeline"]
    assert full["status"] == "skipped" and "preset_epoch" in full["why"]


def test_a_check_past_the_deadline_is_skipped_and_the_json_says_so(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "streaming", "--deadline-s", "0",
                           "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    streaming = json.loads((tmp_path / "gpu-check-latest.json").read_text())["checks"]["streaming"]
    assert streaming["status"] == "skipped" and "--deadline-s" in streaming["why"]


def test_the_gates_a_full_run_did_not_pass_are_named_from_its_record_or_its_error():
    assert gpu_check.gates_not_passed({"gates_not_passed": {"export-x86.rejected": {"path[avx2]": "no qemu"}}}) == {
        "path[avx2]": "no qemu"}  # fmt: skip
    error = "RuntimeError: `kdq pipeline` exited 1: Error: parity gates failed: path[avx2], size (export kept in /x)"
    assert gpu_check.gates_not_passed({"error": error}) == {"path[avx2]": "", "size": ""}
