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
from kdq import cpu, parity
from kdq.artifacts import GATES, ExportError, Target, load_target
from kdq.cpu import (
    CANARY_EXACT,
    CANARY_SATURATED,
    IDENTITY_ENV,
    ORT_EXACT_U8S8,
    avx2_canary,
    avx2_emulator,
    canary_outputs,
    describe_isa,
    has_vnni,
    identity,
    int8_isa,
    native_isa,
    ort_avx2_launcher,
    quantized_engine,
)
from kdq.data import Normalize
from kdq.errors import KdqError
from kdq.export import export, export_onnx
from kdq.int8run import logits_in_child
from kdq.parity import agreement, check_gates
from kdq.quant import QUANTIZATION, Scheme, int8_model
from kdq.recipes import RunOptions, quantize_static
from tests.int8_layers import exact_conv, quantized_convs
from tests.targets import SMOKE_TARGET, smoke_target

ROOT = Path(__file__).parent.parent


def correctness(per_class_right: list[int], per_class: int = 1000) -> np.ndarray:
    """Per-image correctness, class by class: the first `right` images of each class are right."""
    return np.concatenate([np.arange(per_class) < right for right in per_class_right])


def report(**changes) -> dict:
    """A parity report as kdq.parity writes it, from per-image outcomes on 1,000 images of each of two classes:
    float 90%; PyTorch int8 89.5% (class a 10 pt lower, class b 9 pt higher); ONNX Runtime int8 89.5% evenly."""
    correct = {"pytorch_fp32": correctness([900, 900]), "pytorch_int8": correctness([800, 990]),
               "onnxruntime_int8": correctness([895, 895])}  # fmt: skip
    labels = np.repeat([0, 1], 1000)
    base = {
        "classes": ["a", "b"],
        "test_samples": 2000,
        "accuracy": {k: float(v.mean()) for k, v in correct.items()},
        "paired": parity.paired_counts(correct, labels, 2),
        "agreement": {"onnxruntime": {"n": 2000, "flips": 0, "top1_agreement": 1.0, "confident_samples": 1500,
                                      "confident_flips": 0, "confident_margin": 0.5, "confident_margin_logits": 2.0,
                                      "mean_abs_logit_diff": 0.0, "mean_abs_logit_rel": 0.0, "max_abs_logit_diff": 0.0,
                                      "identical": True}},
        "ort_kernels": {"int8": {"QLinearConv": 52}, "model_convs": 52, "float_convs": 0},
        "latency": [],
    }  # fmt: skip
    return base | changes


def by_name(checks: list[dict]) -> dict:
    return {c["name"]: c for c in checks}


def test_accuracy_gates_compare_every_int8_runtime_with_float():
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.004, "min_accuracy": 0.9}))
    lost = checks["int8_accuracy_drop[pytorch_int8]"]
    assert not lost["passed"] and lost["value"] == pytest.approx(0.005) and lost["n"] == 2000  # 0.5 pt > 0.4 pt
    assert checks["min_accuracy[onnxruntime_int8]"]["verdict"] != "pass"  # 89.5% of 2,000 is not proven >= 90%
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.03}))
    assert all(checks[f"int8_accuracy_drop[{rt}_int8]"]["passed"] for rt in ("pytorch", "onnxruntime"))


def test_class_gate_sees_a_class_the_overall_number_hides():
    checks = by_name(check_gates(report(), {"int8_accuracy_drop_max": 0.03, "class_drop_max": 0.05}))
    assert checks["int8_accuracy_drop[pytorch_int8]"]["passed"]  # overall: fine
    lost = checks["class_drop[pytorch_int8]"]
    assert lost["verdict"] == "fail" and lost["value"] == pytest.approx(0.1) and "'a'" in lost["reason"]
    assert checks["class_drop[onnxruntime_int8]"]["passed"]


def test_a_gate_without_its_inputs_fails_with_the_reason():
    no_float = report(accuracy={"pytorch_int8": 0.9, "onnxruntime_int8": 0.9}, paired={})
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
    """Every convolution a QLinearConv, except exactly the layers a repair put in float (kdq.repair)."""
    one_float = report(ort_kernels={"int8": {"QLinearConv": 51}, "model_convs": 52, "float_convs": 1})
    (check,) = check_gates(one_float, {"ort_int8_kernels": True})
    assert not check["passed"] and "1 convolutions in float, 0 expected" in check["reason"]
    assert check_gates(report(), {"ort_int8_kernels": True})[0]["passed"]
    repaired = {"int8": {"QLinearConv": 51}, "model_convs": 51, "float_convs": 1, "float_layers": ["features.4"]}
    (check,) = check_gates(report(ort_kernels=repaired), {"ort_int8_kernels": True})
    assert check["passed"] and check["reason"] == "float by design: features.4"
    requantized = {**repaired, "int8": {"QLinearConv": 52}, "float_convs": 0}  # ONNX Runtime quantized it anyway
    (check,) = check_gates(report(ort_kernels=requantized), {"ort_int8_kernels": True})
    assert not check["passed"] and "0 convolutions in float, 1 expected" in check["reason"]


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
    bad.write_text('paths = ["avx3"]\n' + SMOKE_TARGET.read_text())
    with pytest.raises(ExportError, match="unknown paths"):
        load_target(bad)
    bad.write_text('backend = "qnnpack"\n' + SMOKE_TARGET.read_text())  # x86's paths, inherited
    with pytest.raises(ExportError, match="path avx2 is x86's"):
        load_target(bad)


def test_every_gate_is_one_registered_function_and_a_value_is_never_ignored(tmp_path):
    """Gates are small registered functions (kdq.parity), one per name in kdq.artifacts.GATES. A boolean gate
    set to false, or a [latency] key with a typo, is refused rather than silently meaning something else; each
    runtime's agreement uses its own confident margin; a gate renamed when it became statistical says so."""
    assert set(parity._REGISTRY) == set(GATES)
    for text, message in (("[gates]\ntorchscript_identical = false", "is on when named"),
                          ("[latency]\nround = 3", r"unknown \[latency\] keys \['round'\]")):  # fmt: skip
        bad = tmp_path / "bad.toml"
        bad.write_text(f'extends = "x86"\n{text}\n')
        with pytest.raises(ExportError, match=message):
            load_target(bad)
    gates = {"ort_confident_margin": 1.0, "executorch_confident_margin": 3.0}
    assert [parity.confident_margin(gates, rt) for rt in ("onnxruntime@avx2", "executorch", "torchscript")] == [
        1.0, 3.0, 0.5,
    ]  # fmt: skip
    old = tmp_path / "old.toml"
    old.write_text('extends = "x86"\n[gates]\nort_top1_agreement_min = 0.99\n')
    with pytest.raises(ExportError, match="ort_top1_agreement_min -> ort_flip_rate_max"):
        load_target(old)


def test_a_target_extends_another_and_replaces_its_tables_whole(tmp_path):
    """Test targets derive from the shipped ones (tests/targets.py): the contract is inherited, [gates] is not."""
    smoke, x86 = load_target(SMOKE_TARGET), load_target("x86")
    assert (smoke.backend, smoke.formats, smoke.onnx_opset, smoke.paths) == (
        x86.backend, x86.formats, x86.onnx_opset, x86.paths,
    )  # fmt: skip
    assert "ort_int8_max_ratio_vs_fp32" in x86.gates and "ort_int8_max_ratio_vs_fp32" not in smoke.gates
    arm = load_target(smoke_target("arm", tmp_path))
    assert arm.onnxruntime_config == ORT_EXACT_U8S8 and arm.backend == "qnnpack" and arm.paths == []
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ExportError, match="goes round in a circle"):
        load_target(tmp_path / "a.toml")


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


def test_fbgemm_avx2_path_is_exact_integer_arithmetic_with_seven_bit_activations_only(schemes, digits, tmp_path):
    """PyTorch's x86 engine as an AVX2-only CPU runs it (`KDQ_CPU=avx2`, on any x86 CPU), layer by layer, against
    each convolution computed in exact integer arithmetic (tests/int8_layers.py) from the same int8 input: x86's
    7-bit activations stay within 1 LSB (requantization rounding), full-range 8-bit ones saturate the dense
    convolutions, which they do only on the AVX2 path. (fbgemm's depthwise kernels saturate 8-bit activations
    on VNNI CPUs too: measured 30 LSB here, so the dense ones tell the paths apart.)"""
    assert ck.load_checkpoint(schemes["a7"])[QUANTIZATION]["scheme"] == {"activation_bits": 7, "weight_bits": 8}
    worst = {}
    for name, path in schemes.items():
        ckpt = ck.load_checkpoint(path)
        np.save(tmp_path / "x.npy", Normalize(**ckpt[ck.NORMALIZATION])(digits.test.images[:64]).contiguous().numpy())
        cmd = [sys.executable, "-m", "tests.int8_layers", str(path), str(tmp_path / "x.npy"), str(tmp_path / "o.npz")]
        subprocess.run(cmd, env={**os.environ, IDENTITY_ENV: "avx2"}, cwd=ROOT, check=True, timeout=300)
        seen = np.load(tmp_path / "o.npz")
        for n, m in quantized_convs(int8_model(ckpt, path, engine="fbgemm")).items():
            lsb = np.abs(
                exact_conv(m, seen[f"{n}.x"], seen[f"{n}.x_scale"], seen[f"{n}.x_zero_point"]) - seen[f"{n}.y"]
            )
            key = (name, "dense" if m.groups == 1 else "depthwise")
            worst[key] = max(worst.get(key, 0), int(lsb.max()))
    assert max(worst[("a7", "dense")], worst[("a7", "depthwise")]) <= 1 and worst[("a8", "dense")] >= 8, worst


def test_onnxruntime_avx2_path_equals_its_exact_kernels_with_seven_bit_activations_only(schemes, digits, tmp_path):
    """ONNX Runtime's AVX2 kernels (this CPU's own where it has no VNNI, else emulated: `ort_avx2_launcher`) against
    its own exact u8u8 kernels on the same path: identical logits with 7-bit activations, saturated with 8 bits."""
    launcher, reason = ort_avx2_launcher()
    assert launcher is not None, reason
    diff, agree = {}, {}
    for name, path in schemes.items():
        ckpt = ck.load_checkpoint(path)
        x = Normalize(**ckpt[ck.NORMALIZATION])(digits.test.images[:192]).contiguous().numpy()
        export_onnx(int8_model(ckpt), tmp_path / f"{name}.onnx", 17)
        default = logits_in_child("onnx", tmp_path / f"{name}.onnx", x, launcher=launcher)
        exact = logits_in_child(
            "onnx", tmp_path / f"{name}.onnx", x, ["session.x64quantprecision=1"], launcher=launcher
        )
        diff[name], agree[name] = np.abs(default - exact).max(), (default.argmax(1) == exact.argmax(1)).mean()
    assert diff["a7"] == 0.0 and diff["a8"] > 1.0 and agree["a8"] < 0.99, (diff, agree)


def test_the_avx2_canary_tells_a_saturating_emulator_from_one_without_avx2():
    """An emulated CPU without AVX2 runs MLAS's SSE kernels, which do not saturate: the certificate would 'prove'
    the AVX2 path without running it. The canary refuses such an emulator, and on this CPU's own kernels it
    gives what the ISA kdq records for ONNX Runtime says it should."""
    emulator = avx2_emulator()
    assert emulator is not None, "make setup installs Debian's qemu-user"
    assert avx2_canary(tuple(emulator)) is None
    assert "does not run ONNX Runtime's int16-saturating" in avx2_canary((emulator[0], "-cpu", "Nehalem"))
    expected = {"avx2": CANARY_SATURATED, "vnni": CANARY_EXACT}[native_isa()["onnxruntime"]]
    assert canary_outputs() == {"default": expected, "exact": CANARY_EXACT}


def test_kdq_cpu_avx2_runs_as_an_avx2_only_cpu(monkeypatch):
    """KDQ_CPU=avx2: no VNNI for kdq, fbgemm's saturating kernels in a fresh process, fbgemm as x86's engine."""
    monkeypatch.setenv(IDENTITY_ENV, "avx2")
    assert not has_vnni() and int8_isa() == {"pytorch": "avx2", "onnxruntime": "avx2"}
    assert quantized_engine("x86") == "fbgemm" and quantized_engine("qnnpack") == "qnnpack"
    probe = "import kdq, os; print(kdq.cpu.fbgemm_saturates(), os.environ['FBGEMM_ENABLE_INSTRUCTIONS'])"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "AVX2"]


def test_kdq_cpu_refuses_what_it_cannot_be(monkeypatch):
    """VNNI cannot be emulated (qemu-user has no AVX-512): refused on a CPU without it, one line, either kind."""
    monkeypatch.setenv(IDENTITY_ENV, "vnni")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(KdqError, match="VNNI cannot be emulated"):
        cpu.identity()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx_vnni"})  # ORT's VNNI, not fbgemm's
    with pytest.raises(KdqError, match="VNNI cannot be emulated"):
        cpu.identity()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert cpu.identity() == "vnni" and cpu.has_vnni()
    monkeypatch.setenv(IDENTITY_ENV, "avx512")
    with pytest.raises(KdqError, match="choose from native, avx2, vnni"):
        cpu.identity()


def test_vnni_is_each_librarys_own(monkeypatch):
    """fbgemm has AVX-512 VNNI kernels only; ONNX Runtime's MLAS has AVX-VNNI ones too (Alder Lake and later)."""
    monkeypatch.delenv(IDENTITY_ENV, raising=False)
    assert native_isa({"avx2", "avx_vnni"}) == {"pytorch": "avx2", "onnxruntime": "vnni"}
    assert native_isa({"avx2", "avx512f", "avx512_vnni"}) == {"pytorch": "vnni", "onnxruntime": "vnni"}
    assert native_isa({"avx2", "avx512f"}) == {"pytorch": "avx2", "onnxruntime": "avx2"}
    assert not has_vnni({"avx2", "avx_vnni"}) and has_vnni({"avx2", "avx512f", "avx512_vnni"})


def test_certificate_covers_both_paths_and_says_where(smoke_run):
    """Every path the target names ran, and the logits of each are named: the AVX2 path is the native run exactly
    where kdq's CPU identity takes AVX2 for that runtime, else a forced (PyTorch) or emulated (ORT) run."""
    parity = json.loads((smoke_run / "export-x86" / "parity.json").read_text())
    where = parity["where"]
    assert set(parity["paths"]) == set(parity["path_runs"]) == {"native", "avx2", "exact"}
    assert not parity["missing_paths"]
    assert parity["path_runs"]["avx2"] == {
        f"{rt}_int8": f"{rt}_int8" if isa == "avx2" else f"{rt}_int8@avx2" for rt, isa in where["int8_isa"].items()
    }
    assert parity["path_runs"]["exact"] == {"onnxruntime_int8": "onnxruntime_int8@exact"}
    names = {c["name"] for c in parity["checks"]}
    for runs in parity["path_runs"].values():
        assert set(runs.values()) <= set(parity["accuracy"])
        assert {f"int8_accuracy_drop[{key}]" for key in runs.values()} <= names
    assert parity["paths"]["native"].startswith(describe_isa(where["int8_isa"]))
    assert where["cpu_model"] and where["identity"] == identity() and where["torch_cpu_capability"]
    assert where["versions"]["onnxruntime"] and where["threads"]["torch"] >= 1
    manifest = json.loads((smoke_run / "export-x86" / "manifest.json").read_text())
    assert manifest["certificate"]["passed"] and manifest["certificate"]["measured_on"] == where
    assert manifest["certificate"]["path_runs"] == parity["path_runs"]
    md = (smoke_run / "export-x86" / "parity.md").read_text()
    assert "Measured on" in md
    assert set(parity["path_seconds"]) == {"avx2", "exact"}  # each extra path is timed: an emulated one takes minutes
    for path, seconds in parity["path_seconds"].items():
        assert f"- int8 path `{path}`: {parity['paths'][path]} ({seconds:.0f} s)" in md
        # a forced or emulated AVX2 run is a child process (seconds); where AVX2 is this CPU's own path, the
        # native run is reused and takes about none
        in_child = any(key.endswith("@avx2") for key in parity["path_runs"][path].values())
        assert seconds >= 1 if in_child else seconds >= 0


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
    assert checks["ort_flip_rate"]["verdict"] != "fail" and checks["torchscript_identical"]["passed"]
    assert parity["accuracy"]["pytorch_int8"] < parity["accuracy"]["pytorch_fp32"] - 0.1
