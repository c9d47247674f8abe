"""Recipes as TOML files: the built-in presets live in `recipes/NAME.toml`, and users keep their own beside them.

`kdq pipeline --recipe my.toml` runs a file; `kdq recipe show --preset cifar10` prints a built-in one with
every field filled in, to start from. A file names only what differs from `kdq.config`'s defaults. Checking is
strict because a typo in a recipe silently changes a result: an unknown key, a wrong type or a value out of
range is a one-line error naming the key, before anything loads. No torch import (used by `kdq --help`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from kdq.config import (
    BACKENDS,
    DATASETS,
    FLOW_BACKENDS,
    FLOWS,
    KD_LOSSES,
    KD_WEIGHTINGS,
    SCHEDULES,
    STUDENTS,
    TEACHERS,
    Preset,
)
from kdq.errors import KdqError
from kdq.tomlfile import read_toml, shipped_folder


class RecipeError(KdqError):
    """A recipe file or preset name that cannot be used."""


RECIPES_DIR = shipped_folder("recipes", "recipes_toml")
PRESET_NAMES = tuple(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))

# Allowed values, by field name (wherever the field sits).
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS, "teacher": tuple(dict.fromkeys(TEACHERS + STUDENTS)), "student": STUDENTS,
    "kd_loss": KD_LOSSES, "kd_weighting": KD_WEIGHTINGS,
    "schedule": SCHEDULES, "flow": FLOWS, "backend": BACKENDS,
}  # fmt: skip
_RULES: tuple[tuple[str, Callable[[Any], bool], tuple[str, ...]], ...] = (
    (">= 1", lambda v: v >= 1, ("epochs", "batch_size", "calibration_batches")),
    ("> 0", lambda v: v > 0, ("lr", "temperature", "student_width")),
    (">= 0", lambda v: v >= 0, ("weight_decay", "patience", "crop_padding", "cutmix_alpha", "mixup_alpha",
                                "train_subset")),
    ("in [0, 1)", lambda v: 0 <= v < 1, ("momentum", "label_smoothing", "student_dropout", "val_fraction")),
    ("in [0, 1]", lambda v: 0 <= v <= 1, ("alpha", "freeze_bn_after", "freeze_observers_after")),
    ("in [2, 8]", lambda v: 2 <= v <= 8, ("activation_bits", "weight_bits")),
    ("in [16, 1024]", lambda v: 16 <= v <= 1024, ("image_size",)),
)  # fmt: skip
RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {key: (text, ok) for text, ok, keys in _RULES for key in keys}


def get_preset(name: str) -> Preset:
    """A built-in recipe by name (`recipes/NAME.toml`)."""
    if name not in PRESET_NAMES:
        raise RecipeError(f"unknown preset {name!r}; choose from: {', '.join(PRESET_NAMES)}")
    return load_recipe(RECIPES_DIR / f"{name}.toml")


def load_recipe(path: Path | str) -> Preset:
    """A recipe file as a `Preset`; its name is the file's `name`, or else the file name without `.toml`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found (start one with `kdq recipe show --preset demo > my.toml`)")
    data = read_toml(path, RecipeError)
    data.setdefault("name", path.stem)
    try:
        preset = _build(Preset, data, "")
    except (RecipeError, ValueError) as e:  # ValueError: a dataclass's own check across fields
        raise RecipeError(f"{path}: {e}") from None
    if preset.quant.backend not in FLOW_BACKENDS[preset.quant.flow]:
        raise RecipeError(
            f"{path}: quant.backend: the {preset.quant.flow} flow has no backend {preset.quant.backend!r}; "
            f"choose from: {', '.join(FLOW_BACKENDS[preset.quant.flow])}"
        )
    return preset


def _build(cls: type, data: dict[str, Any], prefix: str):
    """`cls(**data)`, checking every key and value against the dataclass's fields and their types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        table = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise RecipeError(f"unknown key {prefix + unknown[0]!r}; {table} has: {', '.join(fields)}")
    required = [f.name for f in fields.values() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise RecipeError(f"missing key {prefix + missing[0]!r} (no default)")
    values = {}
    for key, value in data.items():
        name, kind = prefix + key, hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise RecipeError(f"{name}: expected a table ([{name}]), got {value!r}")
            values[key] = _build(kind, value, f"{name}.")
        else:
            values[key] = _check_value(name, key, value, kind)
    return cls(**values)


def _check_value(name: str, key: str, value: Any, kind: Any) -> Any:
    """`int | None` fields take an int (TOML has no null: leaving the key out keeps None)."""
    expected = (
        next(a for a in typing.get_args(kind) if a is not type(None)) if isinstance(kind, types.UnionType) else kind
    )
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:  # bool is not an int here: `epochs = true` is a mistake
        raise RecipeError(f"{name}: expected {expected.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise RecipeError(f"{name}: {value!r} is not one of: {', '.join(CHOICES[key])}")
    if key in RANGES and not RANGES[key][1](value):
        raise RecipeError(f"{name}: {value!r} is out of range (must be {RANGES[key][0]})")
    return value


def recipe_toml(preset: Preset) -> str:
    """Every field of `preset` as a recipe file that `load_recipe` reads back to the same `Preset`.

    TOML has no null: a field left to its flow's default (None) is written as a comment."""
    unset = [f"quant.{k}" for k, v in dataclasses.asdict(preset.quant).items() if v is None]
    header = [
        f"# Recipe {preset.name!r}, every field (kdq recipe show). Run it, or edit a copy and run that:",
        f"#   kdq pipeline --recipe {preset.name}.toml",
        *(f"# {k} is not set: the quantization flow and backend's default (kdq.quant.DEFAULT_BITS)" for k in unset),
    ]
    return "\n".join(header) + "\n" + tomli_w.dumps(_without_none(dataclasses.asdict(preset)))


def _without_none(d: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
