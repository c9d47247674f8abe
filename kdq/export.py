"""`kdq export`: int8 artifacts (eager flow: TorchScript + ONNX; pt2e flow: .pt2, ONNX, ExecuTorch .pte), a
manifest, and a parity certificate.

The export target (backend, opset, formats, parity gates, latency grid) is data: `export/<name>.toml`.
Artifacts are built in a staging folder beside the output and renamed into place unless a gate fails (a
certificate that is only "not proven" lands, and says so in its manifest); a rejected export is kept as
`<out>.rejected` for inspection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import kdq
from kdq import checkpoint as ck
from kdq import pt2e_export
from kdq.artifacts import (
    ARTIFACTS,
    CERTIFIED,
    INPUT_NAME,
    MANIFEST,
    NOT_PROVEN,
    OUTPUT_NAME,
    PARITY_JSON,
    PARITY_MD,
    REJECTED,
    ExportError,
    Target,
    sha256,
)
from kdq.errors import KdqError
from kdq.files import check_writable, save_json, save_text
from kdq.quant import QUANTIZATION, float_reference, int8_model


def export_torchscript(model: nn.Module, path: Path) -> None:
    """script + freeze: bit-exact with the eager int8 model, loadable with torch::jit::load from C++."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.freeze(torch.jit.script(model.eval())), str(path))


def export_onnx(model: nn.Module, path: Path, opset: int, image_size: int = 32) -> None:
    """The TorchScript-based exporter (dynamo=False): the dynamo exporter cannot export eager int8 modules.
    The int8 model becomes a QDQ graph that onnxruntime fuses into QLinearConv / QLinearAdd kernels."""
    import onnx

    x = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )  # fmt: skip
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported {path.name} is not valid ONNX ({str(e).strip().splitlines()[0][:200]})") from e


def write_artifacts(model: nn.Module, flow: str, target: Target, folder: Path, image_size: int = 32) -> dict:
    """Every format the target names, into `folder`; returns extra manifest entries (ExecuTorch's delegation)."""
    extra: dict = {}
    for fmt in target.formats:
        path = folder / ARTIFACTS[fmt]
        if fmt == "torchscript":
            export_torchscript(model, path)
        elif fmt == "onnx" and flow == "eager":
            export_onnx(model, path, target.onnx_opset, image_size)
        elif fmt == "onnx":
            pt2e_export.export_onnx_dynamo(model, path, target.onnx_opset, image_size)
        elif fmt == "pt2":
            pt2e_export.export_pt2(model, path, image_size)
        elif fmt == "executorch":
            delegation = pt2e_export.export_executorch(model, path, image_size)
            extra["executorch"] = {
                "delegation": delegation,
                "backend": "XNNPACK",
                "max_batch": pt2e_export.PTE_MAX_BATCH,
            }
    return extra


def build_manifest(ckpt: dict, checkpoint: Path, target: Target, folder: Path) -> dict:
    import onnx
    import onnxruntime

    norm, size = ckpt[ck.NORMALIZATION], ck.input_size(ckpt)
    return {
        "format_version": 2,  # 2: preprocessing.crop (a runtime that reads only 1 would stretch, not crop)
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(ckpt[ck.CLASSES])], "dtype": "float32"},
        "preprocessing": {
            "size": [size, size],
            "resize": "bilinear",
            "crop": "center",  # kdq.data.fit_image: shorter side to the size, then the center square
            "color": "RGB",
            "scale": 1 / 255,
            "mean": norm["mean"],
            "std": norm["std"],
            "formula": "x = (pixel / 255 - mean[c]) / std[c]",
        },  # fmt: skip
        "classes": ckpt[ck.CLASSES],
        "artifacts": {
            fmt: {
                "file": ARTIFACTS[fmt],
                "sha256": sha256(folder / ARTIFACTS[fmt]),
                "bytes": (folder / ARTIFACTS[fmt]).stat().st_size,
            }
            for fmt in target.formats
        },  # fmt: skip
        "quantization": ckpt[QUANTIZATION],
        "source": {
            "checkpoint": str(checkpoint),
            "sha256": sha256(checkpoint),
            "stage": ckpt[ck.STAGE],
            "arch": ckpt[ck.ARCH],
            "preset": ckpt[ck.PRESET],
        },  # fmt: skip
        "target": {
            "name": target.name,
            "flow": target.flow,
            "backend": target.backend,
            "onnx_opset": target.onnx_opset,
            "gates": target.gates,
            "latency": target.latency,
            "paths": target.paths,
            "onnxruntime_config": target.onnxruntime_config,  # session config entries consumers must set
        },
        "versions": {
            "kdq": kdq.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            **_pt2e_versions(target),
            "python": sys.version.split()[0],
        },  # fmt: skip
    }


def _pt2e_versions(target: Target) -> dict[str, str]:
    if target.flow != "pt2e":
        return {}
    from importlib.metadata import version

    names = ["torchao", "onnxscript"] + (["executorch"] if "executorch" in target.formats else [])
    return {name: version(name) for name in names}


def export(
    checkpoint: Path,
    out: Path,
    target: Target,
    *,
    data_dir: Path = Path("data"),
    verify: bool = True,
    overwrite: bool = False,
    latency_runs: int | None = None,
) -> dict:
    """Export a quantized checkpoint for `target`; returns the parity report (empty when not verified)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    ckpt = ck.load_checkpoint(checkpoint)
    if QUANTIZATION not in ckpt:
        raise ExportError(
            f"{checkpoint} is a float checkpoint; int8 export needs `kdq quantize` or `kdq distill --qat`"
        )
    flow = ckpt[QUANTIZATION]["flow"]
    if flow != target.flow:
        raise ExportError(
            f"{checkpoint} comes from the {flow} flow, target {target.name!r} exports the {target.flow} flow's "
            f"models: quantize with `--flow {target.flow}` first"
        )
    if ckpt[QUANTIZATION]["backend"] != target.backend:
        raise ExportError(
            f"{checkpoint} was quantized for {ckpt[QUANTIZATION]['backend']}, target {target.name!r} needs "
            f"{target.backend}: `kdq quantize --flow {target.flow} --backend {target.backend}` first"
        )
    check_writable(out.parent)
    model = int8_model(ckpt, checkpoint)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        extra = write_artifacts(model, flow, target, staging, ck.input_size(ckpt))
        save_json({**build_manifest(ckpt, checkpoint, target, staging), **extra}, staging / MANIFEST)
        report: dict = {}
        if verify:
            report = _certify(ckpt, checkpoint, staging, target, data_dir, latency_runs)
        if report and report["verdict"] == REJECTED:
            rejected = out.with_name(out.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            staging.rename(rejected)
            failed = [c["name"] for c in report["checks"] if c["verdict"] == "fail"]
            why = _diagnose_rejected(rejected, data_dir)
            raise ExportError(f"parity gates failed: {', '.join(failed)} (export kept in {rejected}; {why})")
        _replace_dir(staging, out)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _diagnose_rejected(folder: Path, data_dir: Path) -> str:
    """`kdq diagnose` of a rejected export, written beside its certificate: where to look next."""
    from kdq.diagnose import DIAGNOSIS_MD, diagnose, write_diagnosis

    try:
        write_diagnosis(diagnose(folder, data_dir), folder)
    except KdqError as e:
        return f"no diagnosis: {str(e).splitlines()[0]}"
    return f"diagnosis: {folder / DIAGNOSIS_MD}"


def existing_certificate(out: Path, checkpoint: Path, target: Target) -> dict | None:
    """The parity report of `out` when it already certifies this very checkpoint for this target, else None.

    Lets `kdq pipeline --resume` skip an export that is up to date (matched by the checkpoint's sha256).
    """
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
        report = json.loads((Path(out) / PARITY_JSON).read_text())
    except (OSError, ValueError):
        return None
    same_source = manifest.get("source", {}).get("sha256") == sha256(Path(checkpoint))
    same_target = manifest.get("target", {}).get("name") == target.name
    return report if same_source and same_target and report.get("verdict") in (CERTIFIED, NOT_PROVEN) else None


def _replace_dir(new: Path, out: Path) -> None:
    """Put `new` at `out`. An existing `out` is exchanged atomically where the OS can (Linux renameat2),
    so that readers never find `out` missing; elsewhere it is renamed away first, then removed."""
    if not out.exists():
        new.rename(out)
    elif _exchange(new, out):
        shutil.rmtree(new)  # now holds the previous export
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux >= 3.15, glibc >= 2.28); False where that is not available."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _certify(ckpt: dict, checkpoint: Path, folder: Path, target: Target, data_dir: Path, runs: int | None) -> dict:
    """Run the parity measurement in a fresh process (an independent load of every artifact)."""
    from kdq.parity import format_report

    with tempfile.TemporaryDirectory(prefix="kdq-ref-") as ref:
        fp32 = float_reference(ckpt)
        if fp32 is not None:  # fp32 artifacts of the model the int8 one came from, for speedups
            if "torchscript" in target.formats:
                export_torchscript(fp32, Path(ref) / ARTIFACTS["torchscript"])
            if "onnx" in target.formats:
                export_onnx(fp32, Path(ref) / ARTIFACTS["onnx"], target.onnx_opset, ck.input_size(ckpt))
            if "executorch_int8_max_ratio_vs_fp32" in target.gates:  # ~45 s of lowering: only for its gate
                pt2e_export.export_executorch(fp32, Path(ref) / ARTIFACTS["executorch"], ck.input_size(ckpt))
        cmd = [sys.executable, "-m", "kdq.parity", str(folder), "--checkpoint", str(checkpoint),
               "--data-dir", str(data_dir), "--out", str(folder / PARITY_JSON)]  # fmt: skip
        if fp32 is not None:
            cmd += ["--reference", ref]
        if runs is not None:
            cmd += ["--latency-runs", str(runs)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"parity run failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    report = json.loads((folder / PARITY_JSON).read_text())
    save_text(format_report(report), folder / PARITY_MD)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["certificate"] = {"passed": report["passed"], "verdict": report["verdict"], "file": PARITY_JSON,
                               "measured_on": report["where"], "paths": report["paths"],
                               "path_runs": report["path_runs"]}  # fmt: skip
    save_json(manifest, folder / MANIFEST)
    return report
