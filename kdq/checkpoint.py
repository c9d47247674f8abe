"""Checkpoints: plain dicts with named keys, saved atomically, loaded without running pickled code."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError
from kdq.files import save_torch
from kdq.models import build_model

# Keys of a checkpoint dict.
ARCH = "arch"  # {"name": str, "num_classes": int, "kwargs": dict}: enough to rebuild the model
MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
EPOCH = "epoch"  # epochs completed
RNG = "rng"
NORMALIZATION = "normalization"  # {"mean": [3 floats], "std": [3 floats]} in [0, 1] pixel units
CLASSES = "classes"
PRESET = "preset"  # the recipe, as a dict
STAGE = "stage"  # "teacher", "baseline", "student", ...
HISTORY = "history"
DONE = "done"  # training finished (all epochs, or early stopping)
BEST = "best"  # while training: {"epoch", "model"} of the best validation epoch so far
SELECTED_EPOCH = "selected_epoch"  # when done: the epoch whose weights `model` holds (best validation accuracy)
RECIPE = "recipe"  # what a resumed run must not change: arch, optim, augment, seed, KD weights

REQUIRED = (ARCH, MODEL, NORMALIZATION, CLASSES, STAGE)


def input_size(ckpt: dict[str, Any]) -> int:
    """The square input size the model was trained at (checkpoints from before `image_size` were 32 px)."""
    return int(ckpt.get(PRESET, {}).get("image_size", 32))


class CheckpointError(KdqError):
    """A checkpoint is missing, unsafe or not what the command needs."""


def save_checkpoint(ckpt: dict[str, Any], path: Path | str) -> None:
    save_torch(ckpt, path)


def load_weights(path: Path | str, what: str = "checkpoint") -> Any:
    """`torch.load` on CPU with `weights_only=True`, every failure a one-line CheckpointError.

    A pickle that would import or call anything beyond tensors and plain containers is refused before
    any of it runs; torn, truncated or foreign files (ONNX, TorchScript, text) are named as such.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if path.suffix == ".onnx":
            raise CheckpointError(f"{path} is not a kdq {what} (.onnx files are exported models)") from e
        raise CheckpointError(f"{path}: refused to load: {_unpickling_reason(str(e))} (nothing in it was run)") from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise CheckpointError(f"{path} is a TorchScript model, not a kdq {what}") from e
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt: {_first_line(e)})") from e
    except Exception as e:  # torch.load of a random or torn file: KeyError, EOFError, ValueError, OSError...
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0].split('. ')[0][:160]}" if text else e.__class__.__name__


def _unpickling_reason(message: str) -> str:
    """The useful part of torch's weights-only refusal (its message is a long generic paragraph)."""
    if m := re.search(r"GLOBAL ([\w.]+)", message):
        return f"it would import {m.group(1)}, which a plain-weights file never needs"
    if m := re.search(r"(Unsupported operand \d+|Unsupported class [\w.]+)", message):
        return f"not a plain-weights file ({m.group(1)})"
    return "not a plain-weights file"


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load on CPU with `weights_only=True`: a pickle that would run code is refused, not executed."""
    path = Path(path)
    ckpt = load_weights(path, "checkpoint")
    if not isinstance(ckpt, dict) or (missing := [k for k in REQUIRED if k not in ckpt]):
        raise CheckpointError(f"{path}: not a kdq checkpoint (missing {missing if isinstance(ckpt, dict) else 'dict'})")
    preset = ckpt.get(PRESET) or {}
    if preset.get("dataset") == "folder" and "image_size" not in preset:
        # Its images were stretched to 32x32; this kdq crops them (kdq.data.fit_image): its test split, resume and
        # export preprocessing would all silently differ from what it was trained on.
        raise CheckpointError(
            f"{path}: trained on class folders stretched to 32x32 by a kdq older than --image-size; this kdq reads "
            "folders as Resize + CenterCrop, so evaluation and export would use other pixels: retrain it"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    """Rebuild the float model a checkpoint describes and load its weights (eval mode)."""
    arch = ckpt[ARCH]
    try:
        model = build_model(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot build its model {arch} ({e})") from e
    try:
        model.load_state_dict(ckpt[MODEL])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {arch['name']} ({state_dict_mismatch(e)})") from e
    return model.eval()


def state_dict_mismatch(e: RuntimeError) -> str:
    """The first concrete problem of a failed `load_state_dict` (torch's first line only names the class)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines[1:]:
        if line.startswith("size mismatch"):
            return line.split(". ")[0].replace("torch.Size", "").rstrip(".")
        if line.startswith(("Missing key", "Unexpected key")):
            head, _, keys = line.partition(": ")
            names = re.findall(r'"([^"]+)"', keys)
            return f"{head.lower()}: {', '.join(names[:2])}{', ...' if len(names) > 2 else ''} ({len(names)} in all)"
    return lines[0][:200] if lines else "weights do not match"
