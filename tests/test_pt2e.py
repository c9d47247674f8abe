"""The PT2E flow (torch.export + torchao): QAT mechanics, checkpoints, the x86 ONNX that ORT runs in int8, the
ExecuTorch `.pte` of `kdq pipeline --flow pt2e --target mobile`, and what fails loudly if torch drops a flow."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdq import checkpoint as ck
from kdq import pt2e
from kdq.artifacts import ARTIFACTS, ExportError, load_target, sha256
from kdq.cli import main
from kdq.models import build_model
from kdq.quant import get_flow, int8_model
from tests.conftest import torchx_pipeline
from tests.targets import smoke_target

TESTS = Path(__file__).parent

# Everything each flow stands on. If an upgrade of torch/torchao/executorch removes one, this names it.
FLOW_APIS = {
    "eager": [("torch.ao.quantization", "prepare_qat"), ("torch.ao.quantization", "convert"),
              ("torch.ao.nn.intrinsic.qat", "freeze_bn_stats"), ("torch.jit", "script")],
    "pt2e": [("torchao.quantization.pt2e.quantize_pt2e", "prepare_qat_pt2e"),
             ("torchao.quantization.pt2e.quantize_pt2e", "convert_pt2e"),
             ("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "X86InductorQuantizer"),
             ("torchao.quantization.pt2e", "move_exported_model_to_eval"),
             ("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "XNNPACKQuantizer"),
             ("executorch.exir", "to_edge_transform_and_lower"), ("executorch.runtime", "Runtime")],
}  # fmt: skip


@pytest.mark.parametrize("flow", FLOW_APIS)
def test_both_flows_are_still_shipped(flow):
    missing = []
    for module, name in FLOW_APIS[flow]:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{name} ({e.__class__.__name__})")
    assert not missing, (
        f"the {flow} quantization flow lost {', '.join(missing)} with torch {torch.__version__}: pin the "
        f"previous version in pyproject.toml, or move kdq.quant's default off the {flow} flow"
    )


def test_flow_backend_and_target_mismatches_are_one_line_errors(smoke_run, tmp_path):
    student = smoke_run / "student" / "checkpoint.pt"
    result = CliRunner().invoke(main, ["quantize", str(student), "--backend", "xnnpack", "--out", str(tmp_path / "q")])
    assert result.exit_code == 1 and "--flow pt2e" in result.output, result.output
    qat = smoke_run / "student_qat" / "checkpoint.pt"  # eager flow
    with pytest.raises(ExportError, match="--flow pt2e"):
        from kdq.export import export

        export(qat, tmp_path / "e", load_target("x86-pt2e"))
    bad = tmp_path / "bad.toml"
    bad.write_text('flow = "eager"\nbackend = "x86"\nformats = ["executorch"]\n')
    with pytest.raises(ExportError, match="eager flow cannot export"):
        load_target(bad)
    bad.write_text('flow = "pt2e"\nbackend = "x86"\nformats = ["executorch"]\n')
    with pytest.raises(ExportError, match="needs backend xnnpack"):
        load_target(bad)


def test_residual_adds_are_quantized_for_onnx_runtime(smoke_run):
    """kdq's x86 quantizer puts a quantize on every input of each residual add (torchao's leaves the conv
    output float, and ORT then runs that conv in fp32): after convert, every add reads dequantized inputs."""
    model = ck.model_from_checkpoint(ck.load_checkpoint(smoke_run / "student" / "checkpoint.pt"))
    prepared = pt2e.prepare(model, "x86", qat=False, activation_bits=8, weight_bits=7)
    pt2e.calibrate(prepared, [torch.randn(8, 3, 32, 32)])
    converted = pt2e.convert(prepared)
    adds = [n for n in converted.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 10  # MobileNetV2's residual connections
    for add in adds:
        assert all("dequantize" in str(arg.target) for arg in add.args), add.args
        assert all("quantize_per_tensor" in str(user.target) for user in add.users), add.users
    weights = [n for n in converted.graph.nodes if n.op == "get_attr" and "frozen" in str(n.target)]
    assert all(getattr(converted, w.target).dtype == torch.int8 for w in weights)
    assert max(int(getattr(converted, w.target).abs().max()) for w in weights) <= 64  # 7-bit weights


def test_qat_graph_trains_freezes_and_round_trips_through_a_weights_only_checkpoint(tmp_path):
    flow = get_flow("pt2e")
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 10)
    prepared = flow.prepare(model, "xnnpack", qat=True)
    norms = [n for n in prepared.graph.nodes if str(n.target) in pt2e.BATCH_NORMS]
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    prepared.train()
    assert prepared.training and all(n.args[5] for n in norms)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(prepared(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.qat_epoch_hook(prepared, epoch=4, epochs=5, freeze_bn=0.6, freeze_obs=0.8)
    prepared.eval()
    prepared.train()  # torchao's train() would put training batch norm back: frozen must stay frozen
    assert prepared.training and not any(n.args[5] for n in norms)
    observers = [m for m in prepared.modules() if hasattr(m, "observer_enabled")]
    assert observers and all(int(m.observer_enabled) == 0 for m in observers)

    path = tmp_path / "prepared.pt"
    torch.save(prepared.state_dict(), path)
    again = flow.prepare(model, "xnnpack", qat=True)
    again.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    prepared.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(prepared(x), again(x))


@pytest.fixture(scope="module")
def x86_pt2e(smoke_run, tmp_path_factory):
    """`kdq quantize --flow pt2e --backend x86` (PTQ) of the smoke student, then `kdq export --target` with the
    x86-pt2e contract and gates loosened for a model trained for seconds (tests/targets.py)."""
    root = tmp_path_factory.mktemp("x86pt2e")
    ptq = root / "ptq" / "checkpoint.pt"
    runner = CliRunner()
    student = smoke_run / "student" / "checkpoint.pt"
    result = runner.invoke(main, ["quantize", str(student), "--flow", "pt2e", "--backend", "x86", "--out", str(ptq)])
    assert result.exit_code == 0, result.output
    target = smoke_target("x86-pt2e", root)
    out = root / "export"
    result = runner.invoke(main, ["export", str(ptq), "--target", str(target), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return ptq, out


def test_x86_pt2e_onnx_runs_every_convolution_in_int8(x86_pt2e):
    ptq, out = x86_pt2e
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    kernels = report["ort_kernels"]
    assert kernels["int8"]["QLinearConv"] == kernels["model_convs"] == 52 and kernels["float_convs"] == 0
    assert kernels["int8"].get("QLinearAdd") == 10
    assert report["agreement"]["pt2"]["identical"]  # the saved program computes what the converted model does
    # PyTorch's PT2E model is Q/DQ in float: only ONNX Runtime has an AVX2 path (native, forced or emulated)
    assert set(report["path_runs"]["avx2"]) == {"onnxruntime_int8"} and "pytorch_int8@avx2" not in report["accuracy"]
    assert report["path_runs"]["avx2"]["onnxruntime_int8"] in report["accuracy"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["flow"] == "pt2e" and set(manifest["artifacts"]) == {"pt2", "onnx"}
    for fmt, art in manifest["artifacts"].items():
        assert art["file"] == ARTIFACTS[fmt] and art["sha256"] == sha256(out / art["file"])
    assert {"torchao", "onnxscript"} <= set(manifest["versions"])
    assert manifest["quantization"]["scheme"] == {"activation_bits": 8, "weight_bits": 7}


def test_converted_model_is_cached_beside_the_checkpoint_and_checked(x86_pt2e, tmp_path):
    ptq, _ = x86_pt2e
    ckpt_path = tmp_path / "checkpoint.pt"
    shutil.copy(ptq, ckpt_path)
    cache = ckpt_path.with_name("checkpoint.int8.pt2")
    x = torch.randn(3, 3, 32, 32)
    first = int8_model(ck.load_checkpoint(ckpt_path), ckpt_path)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = int8_model(ck.load_checkpoint(ckpt_path), ckpt_path)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(first(x), second(x))  # loaded, not rebuilt
    shutil.copy(ptq, cache)  # a cache that is not the checkpoint's conversion is rebuilt
    third = int8_model(ck.load_checkpoint(ckpt_path), ckpt_path)
    assert torch.equal(first(x), third(x)) and cache.stat().st_size != ptq.stat().st_size


@pytest.fixture(scope="module")
def mobile_run(smoke_run, tmp_path_factory):
    """The TorchX pipeline job with a mobile target on a copy of the smoke run (it resumes): the float stages are
    kept, the PT2E QAT student (XNNPACK quantizer) trains, since the target's flow is PT2E, and the .pte is
    certified (gates for a seconds-trained model)."""
    run_dir = tmp_path_factory.mktemp("mobile") / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("student_qat", "export-*"))
    gates = {
        "flip_rate_max": 0.05,
        "confident_flip_rate_max": 0.02,
        "mean_abs_logit_rel_max": 0.08,
        "accuracy_delta_max": 0.04,
    }  # tests/smoke-target.toml's, for ExecuTorch
    target = smoke_target("mobile", run_dir.parent, **{f"executorch_{k}": v for k, v in gates.items()})
    output = torchx_pipeline(run_dir, run_dir.parent / "logs", "--target", str(target), "--", "--latency-runs", "3")
    return run_dir, output


def test_pipeline_pt2e_mobile_certifies_an_executorch_program(mobile_run):
    run_dir, output = mobile_run
    out = run_dir / "export-mobile-smoke"
    assert "[teacher] epoch" not in output and "[student] epoch" not in output  # the float stages were kept ...
    assert "[student_qat_pt2e_xnnpack] epoch 3/3" in output  # ... the PT2E QAT student was
    qat = ck.load_checkpoint(run_dir / "student_qat_pt2e_xnnpack" / "checkpoint.pt")
    assert qat["quantization"]["flow"] == "pt2e" and qat["quantization"]["backend"] == "xnnpack"
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    delegation = report["executorch_delegation"]
    assert delegation["delegated_convolutions"] == delegation["model_convs"] == 52
    assert not delegation["int8_ops_outside"]
    assert {"executorch_int8", "pytorch_int8", "pytorch_fp32"} <= set(report["accuracy"])
    manifest = json.loads((out / "manifest.json").read_text())
    pte = out / manifest["artifacts"]["executorch"]["file"]
    assert pte.name == "model.pte" and manifest["artifacts"]["executorch"]["sha256"] == sha256(pte)
    assert "executorch" in manifest["versions"]
    assert {r["runtime"] for r in report["latency"]} >= {"executorch", "pytorch"}


def test_pte_runs_in_executorch_like_the_certificate_says(mobile_run, digits):
    from kdq.data import Normalize
    from kdq.pt2e_export import PTE_MAX_BATCH, pte_runner

    run_dir, _ = mobile_run
    ckpt = ck.load_checkpoint(run_dir / "student_qat_pt2e_xnnpack" / "checkpoint.pt")
    x = Normalize(**ckpt[ck.NORMALIZATION])(digits.test.images).numpy()
    logits = pte_runner(run_dir / "export-mobile-smoke" / "model.pte", threads=1)(x)  # > PTE_MAX_BATCH: split
    assert len(x) > PTE_MAX_BATCH and logits.shape == (len(x), len(digits.classes))
    report = json.loads((run_dir / "export-mobile-smoke" / "parity.json").read_text())
    accuracy = float((logits.argmax(1) == digits.test.labels.numpy()).mean())
    assert np.isclose(accuracy, report["accuracy"]["executorch_int8"])


def test_kdq_edge_runs_the_pte_and_refuses_a_tampered_one(mobile_run, digits, tmp_path):
    """kdq-edge with the ExecuTorch runtime: same preprocessing, same logits as kdq's run of the .pte; the
    sha256 refusal applies to model.pte as to model.onnx."""
    from PIL import Image

    from kdq.data import Normalize
    from kdq.pt2e_export import pte_runner

    edge = Path(__file__).resolve().parents[1] / "deploy" / "edge" / "python"
    sys.path.insert(0, str(edge))
    try:
        from kdq_edge.cli import main as edge_main
        from kdq_edge.errors import IntegrityError
        from kdq_edge.manifest import load_manifest
        from kdq_edge.model import EdgeModel
    finally:
        sys.path.remove(str(edge))
    run_dir, _ = mobile_run
    folder = tmp_path / "export"
    shutil.copytree(run_dir / "export-mobile-smoke", folder)
    pixels = digits.test.images[:12]
    paths = []
    for i, img in enumerate(pixels):  # 32x32 PNGs: kdq-edge's resize to the manifest's 32x32 keeps every pixel
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    model = EdgeModel(load_manifest(folder))
    assert model.format == "executorch"
    got = np.array([r.logits for r in model.classify_paths(paths, k=1)], dtype=np.float32)
    ckpt = ck.load_checkpoint(run_dir / "student_qat_pt2e_xnnpack" / "checkpoint.pt")
    want = pte_runner(folder / "model.pte")(Normalize(**ckpt[ck.NORMALIZATION])(pixels).numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert edge_main(["classify", "--model", str(folder), "--format", "executorch", str(paths[0])]) == 0
    assert edge_main(["classify", "--model", str(folder), "--format", "onnx", str(paths[0])]) == 3  # none exported

    data = bytearray((folder / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.pte").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        EdgeModel(load_manifest(folder))
