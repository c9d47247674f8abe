"""Checkpoints: plain dicts with named keys, saved atomically, loaded without running pickled code."""

from __future__ import annotations

import pickle
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

REQUIRED = (ARCH, MODEL, NORMALIZATION, CLASSES, STAGE)


class CheckpointError(KdqError):
    """A checkpoint is missing, unsafe or not what the command needs."""


def save_checkpoint(ckpt: dict[str, Any], path: Path | str) -> None:
    save_torch(ckpt, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load on CPU with `weights_only=True`: a pickle that would run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"{path}: refused to load (not a plain-weights checkpoint: {first})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__})") from e
    if not isinstance(ckpt, dict) or (missing := [k for k in REQUIRED if k not in ckpt]):
        raise CheckpointError(f"{path}: not a kdq checkpoint (missing {missing if isinstance(ckpt, dict) else 'dict'})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    """Rebuild the float model a checkpoint describes and load its weights (eval mode)."""
    arch = ckpt[ARCH]
    try:
        model = build_model(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build its model {arch} ({e})") from e
    try:
        model.load_state_dict(ckpt[MODEL])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {arch['name']} ({str(e).splitlines()[0]})") from e
    return model.eval()
