"""The certificate proves accuracy on every x86 int8 path: gates as data, no silent skips, both CPU paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdq import checkpoint as ck
from kdq.artifacts import GATES, ExportError, Target, load_target
from kdq.cpu import AVX2_ENV, ORT_EXACT_U8S8, has_vnni
from kdq.data import Normalize
from kdq.export import export
from kdq.int8run import ort_session
from kdq.parity import agreement, check_gates
from kdq.quant import QUANTIZATION, Scheme
from kdq.recipes import RunOptions, quantize_static

SMOKE_TARGET = Path(__file__).parent / "smoke-target.toml"


def report(**changes) -> dict:
    """A parity report as kdq.parity writes it: float 90%, int8 runtimes 89.5% (one class 20 pt lower)."""
    base = {
        "classes": ["a", "b"],
        "accuracy": {"pytorch_fp32": 0.9, "pytorch_int8": 0.895, "onnxruntime_int8": 0.895},
        "per_class": {"pytorch_fp32": [0.9, 0.9], "pytorch_int8": [0.7, 0.99], "onnxruntime_int8": [0.9, 0.89]},
        "agreement": {"onnxruntime": {"top1_agreement": 1.0, "confident_agreement": 1.0, "mean_abs_logit_diff": 0.0,
                                      "mean_abs_logit_rel": 0.0, "max_abs_logit_diff": 0.0, "identical": True,
                                      "confident_samples": 9}},
        "ort_kernels": {"int8": {"QLinearConv": 52}, "model_convs": 52, "float_convs": 0},
        "latency": [],
    }  # fmt: skip
    return base | changes


def by_name(checks: list[dict]) -> dict:
    return {c["name"]: c for c in checks}


def test_accuracy_gates_compare_every_int8_runtime_with_float():
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.004, "min_accuracy": 0.9}))
    assert not checks["int8_accuracy_drop[pytorch_int8]"]["passed"]  # 0.5 pt lost > 0.4
    assert checks["int8_accuracy_drop[pytorch_int8]"]["value"] == pytest.approx(0.005)
    assert not checks["min_accuracy[onnxruntime_int8]"]["passed"]
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.005}))
    assert checks["int8_accuracy_drop[onnxruntime_int8]"]["passed"]


def test_class_gate_sees_a_class_the_overall_number_hides():
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.005, "class_drop_max": 0.05}))
    assert checks["int8_accuracy_drop[pytorch_int8]"]["passed"]  # overall: fine
    lost = checks["class_drop[pytorch_int8]"]
    assert not lost["passed"] and lost["value"] == pytest.approx(0.2) and "'a'" in lost["reason"]
    assert checks["class_drop[onnxruntime_int8]"]["passed"]


def test_a_gate_without_its_inputs_fails_with_the_reason():
    no_float = report(accuracy={"pytorch_int8": 0.9, "onnxruntime_int8": 0.9})
    checks = by_name(check_gates(no_float, {"int8_accuracy_drop_max": 0.005, "torchscript_identical": True}))
    assert (
        not checks["int8_accuracy_drop_max"]["passed"] and "kdq quantize" in checks["int8_accuracy_drop_max"]["reason"]
    )
    assert (
        not checks["torchscript_identical"]["passed"] and "no TorchScript" in checks["torchscript_identical"]["reason"]
    )
    checks = check_gates(report(), {"ort_int8_max_ratio_vs_fp32": {"max": 1.0, "margin": 0.1}})
    assert not checks[0]["passed"] and checks[0]["value"] is None  # no latency rows: no fp32 run to compare with
    assert all(c["passed"] is False for c in check_gates(report(), {"no_such_gate": 1}))


def test_int8_kernel_gate_counts_every_convolution():
    one_float = report(ort_kernels={"int8": {"QLinearConv": 51}, "model_convs": 52, "float_convs": 1})
    (check,) = check_gates(one_float, {"ort_int8_kernels": True})
    assert not check["passed"] and "1 convolutions left in float" in check["reason"]
    assert check_gates(report(), {"ort_int8_kernels": True})[0]["passed"]


def rows(int8: list[float], fp32: list[float], threads: int = 1) -> list[dict]:
    return [{"runtime": "onnxruntime", "precision": p, "batch": 64, "threads": threads, "rounds_ms": v,
             "ms": float(np.median(v))} for p, v in (("int8", int8), ("fp32", fp32))]  # fmt: skip


def test_logit_difference_gate_is_relative_to_the_logit_scale():
    """The same relative error passes at any logit scale (a KD student's logits are several times larger)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((100, 10)).astype(np.float32)
    noise = 0.03 * rng.standard_normal(ref.shape).astype(np.float32)
    gate = {"ort_mean_abs_logit_rel_max": 0.04}
    for scale in (1.0, 8.0):
        agree = agreement(scale * ref, scale * (ref + noise), margin=1.0)
        assert agree["mean_abs_logit_rel"] == pytest.approx(np.abs(noise).mean() / ref.std(), rel=1e-5)
        (check,) = check_gates(report(agreement={"onnxruntime": agree}), gate)
        assert check["passed"], check
    (check,) = check_gates(report(agreement={"onnxruntime": agreement(ref, ref + 3 * noise, 1.0)}), gate)
    assert not check["passed"]


def test_latency_ratio_compares_rounds_and_thread_counts_pairwise_with_a_margin():
    gate = {"ort_int8_max_ratio_vs_fp32": {"max": 1.0, "margin": 0.1}}
    # A busy spell in round 2 slowed both sides: per-round ratios 0.5, 0.5, 0.5. Cell medians alone: 20/20 = 1.0.
    busy = rows([10.0, 40.0, 20.0], [20.0, 80.0, 40.0]) + rows([50.0, 50.0, 50.0], [60.0, 60.0, 60.0], threads=2)
    (check,) = check_gates(report(latency=busy), gate)
    assert check["passed"] and check["value"] == pytest.approx(50 / 60)  # the worse thread count counts
    (check,) = check_gates(report(latency=rows([10.5, 10.5, 10.5], [10.0, 10.0, 10.0])), gate)
    assert check["passed"]  # 1.05 is within the margin
    (check,) = check_gates(report(latency=rows([12.0, 12.0, 12.0], [10.0, 10.0, 10.0])), gate)
    assert not check["passed"]


def test_target_files_name_only_known_gates(tmp_path):
    for name in ("x86", "arm"):
        assert set(load_target(name).gates) <= set(GATES)
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE_TARGET.read_text().replace("[gates]", "[gates]\nort_top1_agrement_min = 0.9"))
    with pytest.raises(ExportError, match="unknown gates.*ort_top1_agrement_min"):
        load_target(bad)
    bad.write_text(SMOKE_TARGET.read_text().replace('paths = ["avx2", "exact"]', 'paths = ["avx3"]'))
    with pytest.raises(ExportError, match="unknown paths"):
        load_target(bad)
    bad.write_text(SMOKE_TARGET.read_text().replace('backend = "x86"', 'backend = "qnnpack"'))
    with pytest.raises(ExportError, match="path avx2 is x86's"):
        load_target(bad)


def test_arm_target_certifies_non_saturating_onnxruntime():
    assert load_target("arm").onnxruntime_config == ORT_EXACT_U8S8
    assert load_target("x86").paths == ["avx2", "exact"]


@pytest.fixture(scope="module")
def schemes(smoke_run, tmp_path_factory) -> dict[str, Path]:
    """PTQ of the smoke student with 8-bit activations (full range) and with x86's default 7-bit ones."""
    out = tmp_path_factory.mktemp("schemes")
    src = smoke_run / "student" / "checkpoint.pt"
    return {
        name: quantize_static(src, out / f"{name}.pt", RunOptions(), batches=8, scheme=scheme)
        for name, scheme in (("a8", Scheme(8, 8)), ("a7", None))
    }


def fbgemm_logits(checkpoint: Path, x: np.ndarray, tmp: Path, env: dict) -> np.ndarray:
    """PyTorch int8 logits on fbgemm (the x86 engine of CPUs without VNNI), in a fresh process with `env`."""
    np.save(tmp / "x.npy", x)
    cmd = [sys.executable, "-m", "kdq.int8run", "torch", str(checkpoint), str(tmp / "x.npy"), str(tmp / "o.npy")]
    subprocess.run([*cmd, "fbgemm"], env={**os.environ, **env}, check=True, timeout=300)
    return np.load(tmp / "o.npy")


def test_seven_bit_activations_are_exact_on_the_avx2_path_and_eight_bits_are_not(schemes, digits, tmp_path):
    """Both code paths on any CPU: the AVX2 path (fbgemm forced to AVX2 on a VNNI CPU, native elsewhere)
    saturates 8-bit activations; with x86's 7-bit default it computes what exact integer arithmetic does
    (fbgemm's VNNI kernels on a VNNI CPU, else ONNX Runtime's exact u8u8 kernels)."""
    from kdq.export import export_onnx
    from kdq.quant import int8_model

    assert ck.load_checkpoint(schemes["a7"])[QUANTIZATION]["scheme"] == {"activation_bits": 7, "weight_bits": 8}
    diff, agree = {}, {}
    for name, path in schemes.items():
        ckpt = ck.load_checkpoint(path)
        x = Normalize(**ckpt[ck.NORMALIZATION])(digits.test.images).contiguous().numpy()
        avx2 = fbgemm_logits(path, x, tmp_path, AVX2_ENV)
        if has_vnni():
            exact = fbgemm_logits(path, x, tmp_path, {})
        else:
            export_onnx(int8_model(ckpt), tmp_path / f"{name}.onnx", 17)
            exact = ort_session(tmp_path / f"{name}.onnx", 1, ORT_EXACT_U8S8).run(None, {"input": x})[0]
        diff[name], agree[name] = np.abs(avx2 - exact).max(), (avx2.argmax(1) == exact.argmax(1)).mean()
    if has_vnni():  # same library, same packing, only the instruction set differs
        assert diff["a7"] == 0.0 and diff["a8"] > 1.0 and agree["a8"] < 0.99
    else:
        assert diff["a8"] > 3 * diff["a7"] and agree["a7"] >= 0.98


def test_certificate_covers_both_paths_and_says_where(smoke_run):
    parity = json.loads((smoke_run / "export-x86" / "parity.json").read_text())
    assert set(parity["paths"]) == {"native", "avx2", "exact"}
    if has_vnni():  # the AVX2 path was forced (PyTorch) and emulated (ORT); without VNNI it is the native one
        assert {"pytorch_int8@avx2", "onnxruntime_int8@avx2"} <= set(parity["accuracy"])
    assert "onnxruntime_int8@exact" in parity["accuracy"]
    names = {c["name"] for c in parity["checks"]}
    assert {f"int8_accuracy_drop[{rt}]" for rt in parity["accuracy"] if "_int8" in rt} <= names
    where = parity["where"]
    assert where["cpu_model"] and isinstance(where["vnni"], bool) and where["torch_cpu_capability"]
    assert where["versions"]["onnxruntime"] and where["threads"]["torch"] >= 1
    manifest = json.loads((smoke_run / "export-x86" / "manifest.json").read_text())
    assert manifest["certificate"]["passed"] and manifest["certificate"]["measured_on"] == where
    assert "Measured on" in (smoke_run / "export-x86" / "parity.md").read_text()


def test_a_broken_int8_model_is_rejected_by_the_accuracy_gate_though_runtimes_agree(schemes, tmp_path):
    """Corrupt the weights of one convolution: PyTorch int8 and ORT still agree (same wrong model), only the
    comparison with the float model catches it."""
    ckpt = ck.load_checkpoint(schemes["a7"])
    key = "features.1.conv.1.weight"  # the first block's 1x1 projection
    w = ckpt[ck.MODEL][key]
    ckpt[ck.MODEL][key] = w.flatten()[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))].view_as(w)
    broken = tmp_path / "broken.pt"
    ck.save_checkpoint(ckpt, broken)
    target = load_target(SMOKE_TARGET)
    target = Target("broken", target.backend, target.formats, 17, target.gates, target.latency)  # native path only
    with pytest.raises(ExportError, match=r"parity gates failed: .*int8_accuracy_drop\[pytorch_int8\]"):
        export(broken, tmp_path / "out", target, latency_runs=2)
    parity = json.loads((tmp_path / "out.rejected" / "parity.json").read_text())
    checks = by_name(parity["checks"])
    assert checks["ort_top1_agreement"]["passed"] and checks["torchscript_identical"]["passed"]
    assert parity["accuracy"]["pytorch_int8"] < parity["accuracy"]["pytorch_fp32"] - 0.1
