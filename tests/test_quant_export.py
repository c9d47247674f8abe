"""PTQ and QAT-KD to int8, and the export stage that certifies TorchScript and ONNX artifacts."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq.artifacts import ExportError, Target, load_target
from kdq.cli import main
from kdq.data import Normalize
from kdq.evaluate import predict_logits
from kdq.export import export
from kdq.models import count_parameters
from kdq.quant import QUANTIZATION, float_reference, int8_model
from kdq.recipes import RunOptions, quantize_static
from kdq.report import write_report
from tests.targets import smoke_target

PARITY_ONLY = {  # the x86 gates without the timing ones: parity must hold on any machine load
    k: v for k, v in load_target("x86").gates.items() if not k.endswith("_ratio_vs_torchscript") and "fp32" not in k
}


def accuracy(model, ckpt, data):
    logits = predict_logits(model, data.test.images, Normalize(**ckpt[ck.NORMALIZATION]))
    return (logits.argmax(1) == data.test.labels).float().mean().item()


@pytest.fixture(scope="module")
def ptq(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq") / "checkpoint.pt"
    return quantize_static(smoke_run / "student" / "checkpoint.pt", out, RunOptions(), batches=8)


def test_qat_kd_student_converts_to_int8_and_keeps_accuracy(smoke_run, digits):
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    assert ckpt[QUANTIZATION]["mode"] == "qat" and ckpt["history"][0]["train_soft_loss"] > 0  # KD drove QAT
    int8 = int8_model(ckpt)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in int8.modules())
    fp32 = float_reference(ckpt)  # the KD student QAT started from
    assert accuracy(int8, ckpt, digits) >= accuracy(fp32, ckpt, digits) - 0.03  # smoke-target.toml: seconds of QAT


def test_ptq_converts_to_int8_and_keeps_accuracy(ptq, smoke_run, digits):
    ckpt = ck.load_checkpoint(ptq)
    assert ckpt[QUANTIZATION] | {"mode": "ptq", "backend": "x86"} == ckpt[QUANTIZATION]
    float_ckpt = ck.load_checkpoint(smoke_run / "student" / "checkpoint.pt")
    fp32, int8 = ck.model_from_checkpoint(float_ckpt), int8_model(ckpt)
    assert accuracy(int8, ckpt, digits) >= accuracy(fp32, float_ckpt, digits) - 0.03  # smoke-target.toml
    # Packed int8 weights are counted; each folded BN trades its 2 vectors for one conv bias.
    assert 0.98 * count_parameters(fp32) < count_parameters(int8) < count_parameters(fp32)
    assert not any(v.is_quantized for v in ckpt[ck.MODEL].values())  # prepared float state: loads weights_only


def test_pipeline_export_is_certified(smoke_run):
    folder = smoke_run / "export-x86"
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and parity["test_samples"] == 360
    assert parity["agreement"]["torchscript"]["identical"]
    assert parity["agreement"]["onnxruntime"]["top1_agreement"] >= 0.95  # smoke-target.toml: a seconds-old model
    kernels = parity["ort_kernels"]  # ORT really runs every convolution in int8
    assert kernels["int8"]["QLinearConv"] == kernels["model_convs"] > 40 and kernels["float_convs"] == 0
    runtimes = {(r["runtime"], r["precision"]) for r in parity["latency"]}
    assert runtimes == {(rt, p) for rt in ("pytorch", "torchscript", "onnxruntime") for p in ("fp32", "int8")}
    assert "**CERTIFIED**" in (folder / "parity.md").read_text()


def test_manifest_records_hashes_and_preprocessing(smoke_run):
    folder = smoke_run / "export-x86"
    manifest = json.loads((folder / "manifest.json").read_text())
    for art in manifest["artifacts"].values():
        assert hashlib.sha256((folder / art["file"]).read_bytes()).hexdigest() == art["sha256"]
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    pre = manifest["preprocessing"]
    assert pre["mean"] == ckpt[ck.NORMALIZATION]["mean"] and pre["std"] == ckpt[ck.NORMALIZATION]["std"]
    assert pre["size"] == [32, 32] and manifest["classes"] == ckpt[ck.CLASSES]
    assert (
        manifest["source"]["sha256"]
        == hashlib.sha256((smoke_run / "student_qat" / "checkpoint.pt").read_bytes()).hexdigest()
    )
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}


FRESH_PROCESS = """
import sys, numpy as np, torch, onnxruntime as ort
folder, x = sys.argv[1], np.load(sys.argv[2])
ts = torch.jit.load(folder + "/model.pt")(torch.from_numpy(x)).numpy()
ox = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
np.save(sys.argv[3], ts); np.save(sys.argv[4], ox)
"""


def test_artifacts_load_in_a_fresh_process_and_agree(smoke_run, digits, tmp_path):
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    x = Normalize(**ckpt[ck.NORMALIZATION])(digits.test.images).contiguous()
    np.save(tmp_path / "x.npy", x.numpy())
    args = [str(smoke_run / "export-x86"), *(str(tmp_path / f) for f in ("x.npy", "ts.npy", "ort.npy"))]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *args], check=True, timeout=300)
    with torch.no_grad():  # the fresh process's engine, the manifest's backend (KDQ_CPU steers kdq only)
        ref = int8_model(ckpt, engine=ckpt[QUANTIZATION]["backend"])(x).numpy()
    assert np.array_equal(np.load(tmp_path / "ts.npy"), ref)
    ort = np.load(tmp_path / "ort.npy")
    assert (ort.argmax(1) == ref.argmax(1)).mean() >= 0.95 and np.abs(ort - ref).mean() <= 0.3


def onnx_biases(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each convolution's bias as ONNX Runtime adds it: (the int32 constant, its DequantizeLinear scale)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {o: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"
                 for o in n.output}  # fmt: skip
    biases = {}
    for node in graph.node:
        q = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.dtype == np.int32:
            module = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
            biases[module] = q.astype(np.float64), constants[node.input[1]].astype(np.float64)
    return biases


def test_onnx_and_pytorch_int8_add_the_same_bias(smoke_run):
    """The legacy exporter rounds each float bias to int32 accumulator units; PyTorch's kernels add it unrounded.
    kdq.quant.biases_on_onnx_grid puts PyTorch's on that grid, so both runtimes compute one model."""
    ckpt = ck.load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    convs = {n: m for n, m in int8_model(ckpt).named_modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)}
    exported = onnx_biases(smoke_run / "export-x86" / "model.onnx")
    assert set(exported) == set(convs)
    for name, conv in convs.items():  # in accumulator units: ONNX's integer, PyTorch's the same to float32 precision
        units, unit = exported[name]
        np.testing.assert_allclose(conv.bias().double().numpy() / unit, units, rtol=2.5e-7, atol=1e-6, err_msg=name)


def test_corrupted_onnx_initializer_fails_the_gates(smoke_run, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    import kdq.export as ex

    real = ex.export_onnx
    corrupted = []

    def export_then_corrupt(model, path, opset, image_size=32):
        real(model, path, opset, image_size)
        m = onnx.load(str(path))
        # int8 conv weights: initializers, or (torch's exporter) Constant nodes' tensors
        tensors = [*m.graph.initializer, *(a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute)]
        weights = [t for t in tensors if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        if not weights:  # the float reference the certificate times against
            return
        corrupted.append(path)
        w = weights[0]  # the stem conv's: scramble it
        scrambled = np.random.default_rng(0).permutation(numpy_helper.to_array(w).ravel()).reshape(tuple(w.dims))
        w.CopyFrom(numpy_helper.from_array(scrambled, w.name))
        onnx.save(m, str(path))

    monkeypatch.setattr(ex, "export_onnx", export_then_corrupt)
    out = tmp_path / "export"
    target = Target("x86-parity", "x86", ["torchscript", "onnx"], 17, PARITY_ONLY, {"batch_sizes": [1], "threads": [1]})
    with pytest.raises(ExportError, match="parity gates failed: .*ort_.*diagnosis: .*diagnosis.md"):
        export(smoke_run / "student_qat" / "checkpoint.pt", out, target, latency_runs=2)
    assert len(corrupted) == 1 and not out.exists()  # the int8 file was corrupted; nothing half-certified at OUT
    report = json.loads((tmp_path / "export.rejected" / "parity.json").read_text())
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    # ONNX Runtime's agreement with PyTorch int8 catches the corrupted ONNX file; TorchScript still agrees bit for bit
    assert {"ort_flip_rate", "ort_mean_abs_logit_rel"} <= failed and "torchscript_identical" not in failed, failed
    # ... and the diagnosis written beside it names the corrupted convolution (the stem) as where ORT parts from PyTorch
    diagnosis = json.loads((tmp_path / "export.rejected" / "diagnosis.json").read_text())
    assert diagnosis["first_divergent_layer"] == "features.0.0" and diagnosis["split"] == "validation"
    # The run's report puts the failed gates on top and shows the diagnosis (kdq pipeline writes it on rejection)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "export.rejected", run / "export-x86.rejected")
    md = write_report(run)[0].read_text()
    top = md.split("\n## ")[0]
    assert "export-x86.rejected: REJECTED" in top and "- ort_flip_rate: fail" in top
    assert "#### export-x86.rejected: diagnosis" in md and "export-x86.rejected_diagnosis.png" in md


def test_qnnpack_target_exports_too(smoke_run, tmp_path):
    """PTQ for ARM (QNNPACK engine, per-channel weights), certified with export/arm.toml's contract (its ONNX Runtime
    session config too: 8-bit activations saturate ORT's AVX2 kernels without it) and smoke-target.toml's gates."""
    src = smoke_run / "student" / "checkpoint.pt"
    arm = smoke_target("arm", tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["quantize", str(src), "--backend", "qnnpack", "--calibration-batches", "8",
                             "--out", str(tmp_path / "q.pt")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(tmp_path / "q.pt"), "--target", str(arm), "--out", str(tmp_path / "arm"),
                             "--latency-runs", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "arm" / "manifest.json").read_text())
    assert manifest["target"]["backend"] == "qnnpack" and manifest["quantization"]["backend"] == "qnnpack"
    parity = json.loads((tmp_path / "arm" / "parity.json").read_text())
    assert parity["passed"] and parity["onnxruntime_config"] == load_target("arm").onnxruntime_config
    float_acc = parity["accuracy"]["pytorch_fp32"]
    assert parity["accuracy"]["pytorch_int8"] >= float_acc - 0.03  # per-tensor depthwise weights gave 10%


def test_export_refuses_float_and_mismatched_checkpoints(smoke_run, ptq, tmp_path):
    r = CliRunner().invoke(main, ["export", str(smoke_run / "student" / "checkpoint.pt"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "is a float checkpoint" in r.output and not (tmp_path / "e").exists()
    r = CliRunner().invoke(main, ["export", str(ptq), "--target", "arm", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "quantized for x86" in r.output


def test_existing_export_needs_overwrite(smoke_run, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export(smoke_run / "student_qat" / "checkpoint.pt", out, load_target("x86"), verify=False)
    assert (out / "keep").read_text() == "x"


@pytest.mark.parametrize("atomic", [True, False])
def test_overwrite_replaces_the_folder_whole(smoke_run, tmp_path, monkeypatch, atomic):
    """--overwrite: the new export takes the old one's place (in one atomic exchange on Linux); nothing is left."""
    if not atomic:
        monkeypatch.setattr("kdq.export._exchange", lambda a, b: False)  # platforms without renameat2
    out = tmp_path / "e"
    out.mkdir()
    (out / "stale").write_text("from the previous export")
    export(smoke_run / "student_qat" / "checkpoint.pt", out, load_target("x86"), verify=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no staging or old folder left beside it
