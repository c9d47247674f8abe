"""`--max-drop`: an eager int8 checkpoint repaired by computing its most sensitive convolutions in float.

NNCF's `quantize_with_accuracy_control` done kdq's way. While int8 loses more than `max_drop` accuracy against
the float model it replaces, on a slice of the *validation* split, the next layer in the diagnosis's order
(`kdq.diagnose.sensitivity`) becomes a `kdq.quant.FloatIsland` with its output grid recalibrated on training
images. The test split stays for the certificate, which then judges the repaired model like any other: the
manifest lists the float layers, the kernel gate expects exactly those to run as float convolutions, and the
latency tables show what they cost.

Eager flow only (QAT and PTQ checkpoints): an island is a module swap. A PT2E graph would need its Q/DQ nodes
around one convolution removed instead; not done yet.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from kdq import checkpoint as ck
from kdq.diagnose import SAMPLES, float_forward, logits, put_in_float, sensitivity, slices
from kdq.errors import KdqError
from kdq.quant import (
    FLOAT_LAYERS,
    QUANTIZATION,
    checkpoint_scheme,
    float_reference,
    int8_model,
    prepared_from_checkpoint,
)

REPAIR = "repair"  # quantization record: how the float layers were chosen
MAX_FLOAT_LAYERS = 8  # beyond this, the model is not "int8 with a few float layers" any more: say so


class RepairError(KdqError):
    """The accuracy budget cannot be met by computing a few layers in float."""


def accuracy(out: torch.Tensor, labels: torch.Tensor) -> float:
    return float((out.argmax(1) == labels).float().mean())


def repair(
    checkpoint: Path, out: Path, max_drop: float, data_dir: Path = Path("data"), samples: int = SAMPLES
) -> tuple[Path, dict]:
    """Write `out`: the eager int8 checkpoint `checkpoint` with the fewest of its most sensitive layers in float
    that bring the validation drop against the float model within `max_drop` (a fraction). Returns (out, record)."""
    ckpt = ck.load_checkpoint(checkpoint)
    q = ckpt.get(QUANTIZATION)
    if q is None or q["flow"] != "eager":
        raise RepairError(f"{checkpoint}: --max-drop repairs eager-flow int8 checkpoints (float and PT2E: not yet)")
    x, labels, calibration = slices(ckpt, data_dir, samples)
    replaced = float_reference(ckpt) or float_forward(ckpt)  # the float model the int8 one replaces
    float_accuracy = accuracy(logits(replaced, x), labels)
    _, ranking = sensitivity(ckpt, x, labels, calibration)
    prepared, model = prepared_from_checkpoint(ckpt), int8_model(ckpt)
    grids: dict[str, dict] = dict(q.get(FLOAT_LAYERS) or {})
    steps = [{"float_layers": list(grids), "accuracy": accuracy(logits(model, x), labels)}]
    candidates = [r["layer"] for r in ranking if r["gain_db"] > 0]
    print(f"[repair] int8: validation accuracy {steps[0]['accuracy']:.2%} (float {float_accuracy:.2%}, "
          f"{len(labels)} images; budget {max_drop:.2%})", file=sys.stderr)  # fmt: skip
    while float_accuracy - steps[-1]["accuracy"] > max_drop:
        if not candidates or len(grids) >= MAX_FLOAT_LAYERS:
            raise RepairError(
                f"--max-drop {max_drop:.2%} not reached: {len(grids)} layers in float still lose "
                f"{float_accuracy - steps[-1]['accuracy']:.2%} on {len(labels)} validation images (retrain, or "
                "allow a larger drop)"
            )
        name = candidates.pop(0)
        grids[name], _ = put_in_float(model, prepared, name, calibration, checkpoint_scheme(ckpt))
        steps.append({"float_layers": list(grids), "accuracy": accuracy(logits(model, x), labels)})
        print(f"[repair] {name} in float: validation accuracy {steps[-1]['accuracy']:.2%} "
              f"(float {float_accuracy:.2%})", file=sys.stderr)  # fmt: skip
    record = {"max_drop": max_drop, "split": "validation", "samples": len(labels), "float_accuracy": float_accuracy,
              "steps": steps, "source": str(checkpoint)}  # fmt: skip
    repaired: dict[str, Any] = {
        **ckpt,
        ck.STAGE: f"{ckpt[ck.STAGE]}_repaired",
        QUANTIZATION: {**q, FLOAT_LAYERS: grids, REPAIR: record},
    }
    ck.save_checkpoint(repaired, out)
    print(f"[repair] {len(grids)} layer(s) in float: {', '.join(grids) or 'none needed'} -> {out}", file=sys.stderr)
    return out, record
