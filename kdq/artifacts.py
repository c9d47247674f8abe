"""The export contract shared by `kdq.export` (writes it) and `kdq.parity` (checks it): artifact names,
sha256, the manifest's integrity check, and export targets (`export/<name>.toml`) with their gate names.

A module of its own so that export and parity depend on it instead of on each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdq.errors import KdqError
from kdq.tomlfile import read_toml, shipped_folder

MANIFEST = "manifest.json"
PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
ARTIFACTS = {"torchscript": "model.pt", "onnx": "model.onnx", "pt2": "model.pt2", "executorch": "model.pte"}
# What each quantization flow can export: TorchScript cannot script a PT2E Q/DQ graph (torch.export's .pt2
# replaces it), and only a PT2E model lowers to ExecuTorch.
FLOW_FORMATS = {"eager": ("torchscript", "onnx"), "pt2e": ("pt2", "onnx", "executorch")}
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# Every gate a target may name, and what it checks (kdq.parity.check_gates evaluates each one named).
GATES = {
    "torchscript_identical": "TorchScript int8 logits equal PyTorch int8 logits bit for bit",
    "ort_flip_rate_max": "ONNX Runtime int8's top-1 differs from PyTorch int8's on at most this fraction of the test "
    "images (95% interval)",
    "ort_confident_margin": "not a gate: the top-2 logit margin, in standard deviations of PyTorch int8's logits, "
    "above which a flip counts as confident (default 0.5)",
    "ort_confident_flip_rate_max": "... and on at most this fraction of the images whose margin exceeds that",
    "ort_mean_abs_logit_rel_max": "mean |ORT int8 - PyTorch int8| logit difference, in units of the standard "
    "deviation of PyTorch's int8 logits (a model's logit scale varies: KD temperature, training), at most this",
    "ort_accuracy_delta_max": "ORT int8 and PyTorch int8 accuracies differ by at most this, either way (paired 95% "
    "interval; exact McNemar p recorded)",
    "ort_int8_kernels": "every convolution runs as an int8 kernel (QLinearConv) in ONNX Runtime, except exactly the "
    "layers a repair put in float (`quantization.float_layers`)",
    "pt2_identical": "torch.export (.pt2) int8 logits equal PyTorch int8 logits bit for bit",
    "executorch_flip_rate_max": "ExecuTorch int8's top-1 differs from PyTorch int8's on at most this fraction",
    "executorch_confident_margin": "not a gate: ExecuTorch's confident margin, in logit stds (default 0.5)",
    "executorch_confident_flip_rate_max": "... and on at most this fraction of the images whose margin exceeds that",
    "executorch_mean_abs_logit_rel_max": "mean |ExecuTorch int8 - PyTorch int8| logit difference / std, at most this",
    "executorch_accuracy_delta_max": "ExecuTorch int8 and PyTorch int8 accuracies differ by at most this, either way",
    "executorch_int8_delegated": "every convolution runs in the XNNPACK delegate, and no quantize, dequantize, "
    "convolution or add is left outside it",
    "executorch_int8_max_ratio_vs_fp32": "ExecuTorch int8 / ExecuTorch fp32 latency at the largest batch, per thread "
    "count",
    "int8_accuracy_drop_max": "every int8 runtime, on every path, loses at most this accuracy vs the float model it "
    "replaces, and vs a QAT model's own float forward (the int8 arithmetic's cost); upper bound of the paired 95% "
    "interval",
    "class_drop_max": "... and at most this on every class (Holm-corrected over the classes)",
    "min_accuracy": "every int8 runtime, on every path, reaches at least this accuracy (lower bound of its 95% "
    "interval)",
    "ort_b1_max_ratio_vs_torchscript": "ORT int8 / TorchScript int8 latency at batch 1, per thread count",
    "ort_int8_max_ratio_vs_fp32": "ORT int8 / ORT fp32 latency at the largest batch, per thread count",
}
RENAMED_GATES = {  # gates of targets written before the certificate's statistics (kdq.stats)
    f"{rt}_top1_agreement_min": f"{rt}_flip_rate_max (= 1 - the agreement; the confident margin is now in logit "
    f"standard deviations, and confident flips are bounded by {rt}_confident_flip_rate_max)"
    for rt in ("ort", "executorch")
}
RATIO_GATES = (
    "ort_b1_max_ratio_vs_torchscript",
    "ort_int8_max_ratio_vs_fp32",
    "executorch_int8_max_ratio_vs_fp32",
)  # value: {max, margin} or a number
BOOLEAN_GATES = ("torchscript_identical", "pt2_identical", "ort_int8_kernels", "executorch_int8_delegated")
LATENCY_KEYS = ("batch_sizes", "threads", "rounds", "warmup", "runs")  # [latency] of a target (kdq.parity)
# A certificate's verdict: every gate passed; some gate failed; none failed but some could not be proven on this
# many test images (kdq.stats). Only a rejected export is refused (kept as OUT.rejected).
CERTIFIED, NOT_PROVEN, REJECTED = "certified", "not proven", "rejected"
PATHS = ("avx2", "exact")  # extra int8 arithmetic paths a target may certify (kdq.cpu, kdq.parity)


class ExportError(KdqError):
    """The export could not be produced, or it failed its parity gates."""


TARGETS_DIR = shipped_folder("export", "targets")


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    formats: list[str]
    onnx_opset: int = 17
    gates: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)  # extra int8 paths to certify, from PATHS
    onnxruntime_config: dict[str, str] = field(default_factory=dict)  # session config entries every consumer sets
    flow: str = "eager"  # the quantization flow the checkpoint must come from (kdq.quant)


def target_file(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """The TOML file of a target named `export/NAME.toml`, or given as a path (relative to `relative_to`'s folder)."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = TARGETS_DIR / f"{name_or_path}.toml"
    elif relative_to is not None and not path.is_absolute():
        path = relative_to.parent / path
    if not path.is_file():
        known = sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))
        raise ExportError(
            f"unknown export target {str(name_or_path)!r}; choose from: {', '.join(known)} or a .toml path"
        )
    return path


def target_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A target file's keys, over those of the target it `extends` (by name or path). A table it gives
    ([gates], [latency]) replaces the base's whole: every gate a target checks is written in one file."""
    if path.resolve() in seen:
        raise ExportError(f"{path}: `extends` goes round in a circle ({' -> '.join(p.name for p in seen)})")
    data = read_toml(path, ExportError)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ExportError(f"{path}: extends takes a target name or a .toml path")
    return target_data(target_file(base, path), (*seen, path.resolve())) | data


def load_target(name_or_path: str | Path) -> Target:
    """A target by name (`export/NAME.toml`) or by path to a TOML file; unknown keys, formats, gates or paths
    are one-line errors here, before anything is exported."""
    path = target_file(name_or_path)
    data = target_data(path)
    unknown = set(data) - {f for f in Target.__dataclass_fields__ if f != "name"}
    if unknown:
        raise ExportError(f"{path}: unknown keys {sorted(unknown)}")
    renamed = {g: RENAMED_GATES[g] for g in data.get("gates", {}) if g in RENAMED_GATES}
    if renamed:
        raise ExportError(f"{path}: gates renamed when they became statistical: " +
                          "; ".join(f"{old} -> {new}" for old, new in renamed.items()))  # fmt: skip
    for key, known in (("formats", ARTIFACTS), ("gates", GATES), ("paths", PATHS)):
        bad = set(data.get(key, [])) - set(known)
        if bad:
            raise ExportError(f"{path}: unknown {key} {sorted(bad)}; choose from: {', '.join(known)}")
    flow = data.get("flow", "eager")
    if flow not in FLOW_FORMATS:
        raise ExportError(f"{path}: unknown flow {flow!r}; choose from: {', '.join(FLOW_FORMATS)}")
    bad = set(data.get("formats", [])) - set(FLOW_FORMATS[flow])
    if bad:
        raise ExportError(
            f"{path}: the {flow} flow cannot export {sorted(bad)}; it exports {', '.join(FLOW_FORMATS[flow])}"
        )
    if "executorch" in data.get("formats", []) and data.get("backend") != "xnnpack":
        raise ExportError(f"{path}: format executorch is lowered to XNNPACK: it needs backend xnnpack")
    if "avx2" in data.get("paths", []) and data.get("backend") != "x86":
        raise ExportError(f"{path}: path avx2 is x86's int8 arithmetic; a {data.get('backend')} target cannot take it")
    for gate in BOOLEAN_GATES:
        if data.get("gates", {}).get(gate, True) is not True:
            raise ExportError(f"{path}: gate {gate} is on when named (true); remove it to leave it out")
    bad = set(data.get("latency", {})) - set(LATENCY_KEYS)
    if bad:
        raise ExportError(f"{path}: unknown [latency] keys {sorted(bad)}; choose from: {', '.join(LATENCY_KEYS)}")
    for gate in RATIO_GATES:
        spec = data.get("gates", {}).get(gate)
        if isinstance(spec, dict) and set(spec) - {"max", "margin"}:
            raise ExportError(f"{path}: gate {gate} takes a number or {{max = ..., margin = ...}}")
    return Target(name=path.stem, **data)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_artifacts(folder: Path) -> dict:
    """The manifest, after checking that every artifact it lists has the recorded sha256.

    Nothing in the folder is loaded before this passes; a failure is a one-line ExportError.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: {folder} is not a kdq export folder")
    try:
        manifest = json.loads(path.read_text())
        artifacts = manifest["artifacts"]
        files = {fmt: (art["file"], art["sha256"]) for fmt, art in artifacts.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path}: not a kdq export manifest ({e.__class__.__name__})") from e
    for name, expected in files.values():
        if not isinstance(name, str) or Path(name).name != name:  # only plain names: never a path out of the folder
            raise ExportError(f"{path}: artifact name {name!r} is not a plain file name")
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing (the manifest lists it)")
        actual = sha256(folder / name)
        if actual != expected:
            raise ExportError(
                f"{folder / name}: sha256 {actual[:12]}… does not match the manifest ({str(expected)[:12]}…); "
                "refusing to load it"
            )
    return manifest
