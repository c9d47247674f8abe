"""`kdq diagnose`: which layers an int8 model's error comes from, and where ONNX Runtime parts from PyTorch.

Measured on a slice of the *validation* split, never the test split: the certificate judges on the test images,
and a diagnosis (or a repair chosen from it) that had seen them would bias that judgement.
- **Sensitivity** (AIMET's quant analyzer, NNCF's accuracy control rank layers the same way): the QAT model with
  every fake-quant on, then with only one layer left in float (its weight and output fake-quant off), against the
  model's own float forward (all off). Per layer: the logits' SQNR, the top-1 agreement with float and the
  accuracy, ranked by how many dB leaving that layer in float gains.
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

from kdq import checkpoint as ck
from kdq.artifacts import ARTIFACTS, MANIFEST, ExportError, sha256
from kdq.config import Preset
from kdq.data import Normalize
from kdq.errors import KdqError
from kdq.files import save_json, save_png, save_text
from kdq.int8run import ort_session
from kdq.quant import QUANTIZATION, int8_model, prepared_from_checkpoint
from kdq.recipes import RunOptions, load_data

DIAGNOSIS_JSON, DIAGNOSIS_MD, DIAGNOSIS_PNG = "diagnosis.json", "diagnosis.md", "diagnosis.png"
SAMPLES = 512  # validation images: enough for a ranking, a few seconds per layer


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `other` against `reference`, in dB (inf when identical)."""
    noise = float((reference - other).pow(2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(float(reference.pow(2).sum()) / noise))


def quantized_layers(prepared: nn.Module) -> dict[str, nn.Module]:
    """The layers of an eager QAT model that quantize their weights (conv, linear; fused with BN / ReLU)."""
    return {name: m for name, m in prepared.named_modules() if hasattr(m, "weight_fake_quant")}


def _switch(module: nn.Module, on: bool) -> None:
    """Turn a layer's weight and output fake-quant on or off."""
    for fq in (module.weight_fake_quant, getattr(module, "activation_post_process", None)):
        if fq is not None:
            fq.enable_fake_quant(on)


def sensitivity(ckpt: dict[str, Any], x: torch.Tensor, labels: torch.Tensor) -> tuple[dict, list[dict]]:
    """The all-int8 model's SQNR, agreement and accuracy, and per quantized layer the same with only that layer
    left in float (see module doc), most sensitive first."""
    model = prepared_from_checkpoint(ckpt)
    model.apply(torch.ao.quantization.disable_observer)  # measuring must not move the ranges it measures
    layers = quantized_layers(model)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])

    model.apply(torch.ao.quantization.disable_fake_quant)
    reference = forward()
    model.apply(torch.ao.quantization.enable_fake_quant)
    quantized = forward()
    base = sqnr_db(reference, quantized)
    rows = []
    for name, layer in layers.items():
        _switch(layer, False)
        logits = forward()
        _switch(layer, True)
        rows.append({
            "layer": name,
            "sqnr_db": sqnr_db(reference, logits),
            "gain_db": sqnr_db(reference, logits) - base,
            "agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
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
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)}
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


def validation_slice(ckpt: dict[str, Any], data_dir: Path, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` images of the recipe's validation split (drawn with the recipe's seed), normalized."""
    preset = Preset.from_dict(ckpt[ck.PRESET])
    data = load_data(preset, RunOptions(data_dir=Path(data_dir)))
    if data.val is None:
        raise KdqError("diagnose: the recipe holds out no validation split (val_fraction 0); it never uses test images")
    pick = torch.randperm(len(data.val.labels), generator=torch.Generator().manual_seed(preset.seed))[:samples]
    return Normalize(**ckpt[ck.NORMALIZATION])(data.val.images[pick]).contiguous(), data.val.labels[pick]


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
    if ckpt[QUANTIZATION]["flow"] != "eager" or ckpt[QUANTIZATION]["mode"] != "qat":
        raise KdqError("diagnose: layer sensitivity needs an eager QAT checkpoint (`kdq distill --qat`) for now")
    x, labels = validation_slice(ckpt, data_dir, samples)
    summary, layers = sensitivity(ckpt, x, labels)
    result = {"checkpoint": str(checkpoint), "samples": len(labels), "split": "validation", "summary": summary,
              "sensitivity": layers}  # fmt: skip
    onnx_path = folder / ARTIFACTS["onnx"] if folder else None
    if onnx_path and onnx_path.is_file() and ckpt[QUANTIZATION]["flow"] == "eager":
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
        f"All layers int8 (fake-quant): SQNR {s['sqnr_db']:.1f} dB against the float forward, top-1 agreement "
        f"{s['agreement']:.2%}, accuracy {s['accuracy_int8']:.2%} (float {s['accuracy_float']:.2%}).",
        "",
        f"| layer left in float (top {top}) | SQNR dB | gain dB | agreement with float | accuracy |",
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
    ax.set_ylabel("SQNR gain (dB)\nwhen left in float")
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
