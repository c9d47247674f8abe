"""`make gpu-check` runs before a GPU is lent: the same script on the CPU (`--device cpu --tiny`), every check
through kdq's own code paths, with a JSON of what ran. On a GPU the CUDA paths run instead (not in CI)."""

import json

import torch

from bench import gpu_check
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
