"""`kdq diagnose`: which layers an int8 model's error comes from, and where ONNX Runtime parts from PyTorch.

Measured on a slice of the *validation* split, never the test split: the certificate judges on the test images,
and a diagnosis (or a repair chosen from it) that had seen them would bias that judgement.
- **Sensitivity** (AIMET's quant analyzer, NNCF's accuracy control rank layers the same way): the eager int8
  model (QAT or PTQ), then the same with only one convolution computed in float (`kdq.quant.FloatIsland`, its
  output grid recalibrated on training images), against the float forward (a QAT model's own, fake-quant off;
  else the float model a PTQ checkpoint came from). Per layer: the logits' SQNR, the top-1 agreement with float
  and the accuracy, ranked by how many dB computing that layer in float gains. `kdq.repair` follows this order.
- **Runtime divergence** (eager flow, ONNX export): every convolution's int8 output in PyTorch and in ONNX
  Runtime, in LSB (the tensors ORT computes, requested as extra graph outputs: the fused QLinearConv kernels
  still run, the logits are unchanged). The first layer that differs by more than 1 LSB is named, and how much
  each layer adds to the mean difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao import quantization as tq

from kdq import checkpoint as ck
from kdq.artifacts import ARTIFACTS, MANIFEST, ExportError, sha256
from kdq.config import Preset
from kdq.data import Normalize
from kdq.errors import KdqError
from kdq.files import save_json, save_png, save_text
from kdq.int8run import ort_session
from kdq.quant import (
    QUANTIZATION,
    FloatIsland,
    checkpoint_scheme,
    float_layer,
    float_reference,
    int8_convolutions,
    int8_model,
    prepared_from_checkpoint,
    qat_float_forward,
    replace_layer,
)
from kdq.recipes import RunOptions, load_data

DIAGNOSIS_JSON, DIAGNOSIS_MD, DIAGNOSIS_PNG = "diagnosis.json", "diagnosis.md", "diagnosis.png"
SAMPLES = 512  # validation images: enough for a ranking, a few seconds per layer


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `other` against `reference`, in dB (inf when identical)."""
    noise = float((reference - other).pow(2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(float(reference.pow(2).sum()) / noise))


def logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def float_forward(ckpt: dict[str, Any]) -> nn.Module:
    """What int8 is measured against: a QAT model's own float forward (the int8 arithmetic's cost alone), else the
    float model a PTQ checkpoint came from."""
    reference = qat_float_forward(ckpt) or float_reference(ckpt)
    if reference is None:
        raise KdqError("diagnose: this checkpoint records no float model to measure int8 against")
    return reference


def island_grid(model: nn.Module, prepared: nn.Module, name: str, calibration: torch.Tensor, scheme) -> dict:
    """The output grid of layer `name` computed in float inside int8 `model`: a min/max range over the float
    layer's outputs on `calibration` (training images), in the scheme's activation range. Not the int8 layer's
    own grid: that range may be what is broken."""
    layer = float_layer(prepared, name)
    observer = tq.MinMaxObserver(quant_min=0, quant_max=2**scheme.activation_bits - 1, dtype=torch.quint8)

    def observe(module, inputs, output) -> None:  # returns None: the int8 layer's output flows on unchanged
        observer(layer(inputs[0].dequantize()))

    hook = model.get_submodule(name).register_forward_hook(observe)
    try:
        logits(model, calibration)
    finally:
        hook.remove()
    scale, zero_point = observer.calculate_qparams()
    return {"scale": float(scale), "zero_point": int(zero_point)}


def put_in_float(
    model: nn.Module, prepared: nn.Module, name: str, calibration: torch.Tensor, scheme
) -> tuple[dict, nn.Module]:
    """Compute layer `name` of int8 `model` in float, in place (a `FloatIsland` on its recalibrated grid).
    Returns (its grid, the int8 module it replaced)."""
    grid = island_grid(model, prepared, name, calibration, scheme)
    return grid, replace_layer(model, name, FloatIsland(float_layer(prepared, name), **grid))


def sensitivity(
    ckpt: dict[str, Any], x: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor
) -> tuple[dict, list[dict]]:
    """The int8 model's SQNR, agreement and accuracy against its float forward, and per convolution the same with
    only that layer computed in float (a `FloatIsland`, its output grid recalibrated), most sensitive first."""
    reference = logits(float_forward(ckpt), x)
    prepared, model = prepared_from_checkpoint(ckpt), int8_model(ckpt)
    quantized = logits(model, x)
    base = sqnr_db(reference, quantized)
    rows = []
    for name, layer in int8_convolutions(model).items():
        put_in_float(model, prepared, name, calibration, checkpoint_scheme(ckpt))
        out = logits(model, x)
        replace_layer(model, name, layer)
        rows.append({
            "layer": name,
            "sqnr_db": sqnr_db(reference, out),
            "gain_db": sqnr_db(reference, out) - base,
            "agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "accuracy": float((out.argmax(1) == labels).float().mean()),
        })  # fmt: skip
    rows.sort(key=lambda r: -r["gain_db"])
    summary = {"sqnr_db": base, "accuracy_int8": float((quantized.argmax(1) == labels).float().mean()),
               "accuracy_float": float((reference.argmax(1) == labels).float().mean()),
               "agreement": float((quantized.argmax(1) == reference.argmax(1)).float().mean())}  # fmt: skip
    return summary, rows


def divergence(ckpt: dict[str, Any], checkpoint: Path, onnx_path: Path, x: torch.Tensor, config: dict) -> list[dict]:
    """Per convolution, in execution order: PyTorch int8's and ONNX Runtime's int8 outputs compared in LSB."""
    import onnx

    model = int8_model(ckpt, checkpoint)
    convs = int8_convolutions(model)
    outputs: dict[str, torch.Tensor] = {}
    input_scales: dict[str, float] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            outputs[name], input_scales[name] = output, inputs[0].q_scale()

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in convs.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    graph = onnx.load(str(onnx_path))
    quantize = {}  # module path -> the QuantizeLinear that quantizes its output (the last one in its scope)
    for node in graph.graph.node:
        if node.op_type == "QuantizeLinear":
            quantize[node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")] = node.output[0]
    wanted = {n: quantize[n] for n in outputs if n in quantize}
    for tensor in wanted.values():
        graph.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    session = ort_session(graph.SerializeToString(), 1, config)
    names = [o.name for o in session.get_outputs()]
    ort = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    rows, previous = [], 0.0
    for name in outputs:
        if name not in wanted:
            continue
        diff = np.abs(outputs[name].int_repr().numpy().astype(np.int32) - ort[wanted[name]].astype(np.int32))
        mean = float(diff.mean())
        multiplier = requantization_multipliers(convs[name], input_scales[name])
        rows.append({"layer": name, "max_lsb": int(diff.max()), "beyond_1_lsb": float((diff > 1).mean()),
                     "mean_lsb": mean, "added_mean_lsb": mean - previous, "max_multiplier": float(multiplier.max()),
                     "channels_multiplier_ge_1": int((multiplier >= 1).sum())})  # fmt: skip
        previous = mean
    return rows


def requantization_multipliers(conv: nn.Module, input_scale: float) -> np.ndarray:
    """Per output channel, input scale x weight scale / output scale: one accumulator unit in output LSB. Above 1 a
    channel's int8 grid is coarser than its output's (a BN-folded channel far larger than the rest), and a kernel
    that differs by one accumulator unit differs by that many LSB."""
    w = conv.weight()
    per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    scales = w.q_per_channel_scales() if per_channel else torch.tensor([w.q_scale()])
    return (input_scale * scales.double() / conv.scale).numpy()


def slices(ckpt: dict[str, Any], data_dir: Path, samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels) of `samples` validation images, and `samples` training images to calibrate float layers'
    output grids on; drawn with the recipe's seed, normalized. Never a test image."""
    preset = Preset.from_dict(ckpt[ck.PRESET])
    data = load_data(preset, RunOptions(data_dir=Path(data_dir)))
    if data.val is None:
        raise KdqError("diagnose: the recipe holds out no validation split (val_fraction 0); it never uses test images")
    normalize = Normalize(**ckpt[ck.NORMALIZATION])
    seed = torch.Generator().manual_seed(preset.seed)
    pick = torch.randperm(len(data.val.labels), generator=seed)[:samples]
    train = torch.randperm(len(data.train.labels), generator=seed)[:samples]
    return (normalize(data.val.images[pick]).contiguous(), data.val.labels[pick],
            normalize(data.train.images[train]).contiguous())  # fmt: skip


def resolve(source: Path) -> tuple[Path, Path | None, dict]:
    """(checkpoint, export folder or None, ONNX Runtime config) of an export folder or a checkpoint file."""
    source = Path(source)
    if source.is_dir():
        manifest_path = source / MANIFEST
        if not manifest_path.is_file():
            raise ExportError(f"{source}: no {MANIFEST}: not an export folder")
        manifest = json.loads(manifest_path.read_text())
        checkpoint = Path(manifest["source"]["checkpoint"])
        if not checkpoint.is_file() or sha256(checkpoint) != manifest["source"]["sha256"]:
            raise ExportError(f"{source}: its checkpoint {checkpoint} is missing or changed since the export")
        return checkpoint, source, manifest["target"].get("onnxruntime_config", {})
    return source, None, {}


def diagnose(source: Path, data_dir: Path = Path("data"), samples: int = SAMPLES) -> dict:
    """Sensitivity of every quantized layer, and (for an export with ONNX) PyTorch vs ORT divergence per layer."""
    checkpoint, folder, config = resolve(source)
    ckpt = ck.load_checkpoint(checkpoint)
    if QUANTIZATION not in ckpt:
        raise KdqError(f"{checkpoint} is a float checkpoint: nothing quantized to diagnose")
    if ckpt[QUANTIZATION]["flow"] != "eager":
        raise KdqError("diagnose: layer sensitivity needs an eager-flow checkpoint (PT2E graphs: not yet)")
    x, labels, calibration = slices(ckpt, data_dir, samples)
    summary, layers = sensitivity(ckpt, x, labels, calibration)
    result = {"checkpoint": str(checkpoint), "samples": len(labels), "split": "validation", "summary": summary,
              "sensitivity": layers}  # fmt: skip
    onnx_path = folder / ARTIFACTS["onnx"] if folder else None
    if onnx_path and onnx_path.is_file():
        rows = divergence(ckpt, checkpoint, onnx_path, x, config)
        result["divergence"] = rows
        first = next((r["layer"] for r in rows if r["max_lsb"] > 1), None)
        result["first_divergent_layer"] = first
    return result


def format_diagnosis(d: dict, top: int = 10) -> str:
    """Markdown: the most sensitive layers, then where ONNX Runtime parts from PyTorch."""
    s = d["summary"]
    lines = [
        f"# Diagnosis ({d['samples']} {d['split']} images)",
        "",
        f"All layers int8: SQNR {s['sqnr_db']:.1f} dB against the float forward, top-1 agreement "
        f"{s['agreement']:.2%}, accuracy {s['accuracy_int8']:.2%} (float {s['accuracy_float']:.2%}).",
        "",
        f"| layer computed in float (top {top}) | SQNR dB | gain dB | agreement with float | accuracy |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['layer']} | {r['sqnr_db']:.1f} | {r['gain_db']:+.2f} | {r['agreement']:.2%} "
              f"| {r['accuracy']:.2%} |" for r in d["sensitivity"][:top]]  # fmt: skip
    if "divergence" in d:
        first = d.get("first_divergent_layer")
        lines += ["", f"PyTorch int8 vs ONNX Runtime int8, per convolution: first beyond 1 LSB: **{first or 'none'}**",
                  "", "| layer | max LSB | share > 1 LSB | mean LSB | added | max requant. multiplier "
                  "(channels ≥ 1) |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['layer']} | {r['max_lsb']} | {r['beyond_1_lsb']:.2%} | {r['mean_lsb']:.3f} | "
                  f"{r['added_mean_lsb']:+.3f} | {_multiplier(r)} |" for r in d["divergence"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def _multiplier(row: dict) -> str:
    """A diagnosis written before kdq recorded multipliers has none: the report still renders it."""
    if "max_multiplier" not in row:
        return "—"
    return f"{row['max_multiplier']:.3g} ({row['channels_multiplier_ge_1']})"


def plot_diagnosis(d: dict):
    """Per layer, in network order: SQNR gain when left in float, and ORT's mean divergence from PyTorch."""
    from matplotlib.figure import Figure

    order = {r["layer"]: r for r in d["sensitivity"]}
    layers = sorted(order, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    panels = 2 if "divergence" in d else 1
    fig = Figure(figsize=(10, 3.2 * panels))
    axes = fig.subplots(panels, 1, squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(layers)), [order[n]["gain_db"] for n in layers])
    ax.set_ylabel("SQNR gain (dB)\nwhen in float")
    ax.set_title(f"Layer sensitivity ({d['samples']} validation images)")
    if "divergence" in d:
        ax = axes[1][0]
        ax.plot([r["mean_lsb"] for r in d["divergence"]], marker=".", label="mean |Δ| (LSB)")
        ax.plot([r["max_lsb"] for r in d["divergence"]], marker=".", label="max |Δ| (LSB)")
        ax.set_ylabel("ORT vs PyTorch int8")
        ax.set_xlabel("convolution, in execution order")
        ax.legend()
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_diagnosis(d: dict, out: Path) -> list[Path]:
    """diagnosis.json, diagnosis.md and diagnosis.png in folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_json(d, out / DIAGNOSIS_JSON)
    save_text(format_diagnosis(d), out / DIAGNOSIS_MD)
    save_png(plot_diagnosis(d), out / DIAGNOSIS_PNG)
    return [out / DIAGNOSIS_JSON, out / DIAGNOSIS_MD, out / DIAGNOSIS_PNG]
