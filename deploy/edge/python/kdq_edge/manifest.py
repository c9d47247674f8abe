"""The export contract: `manifest.json` written by `kdq export`, read and checked before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdq_edge.errors import IntegrityError, ManifestError, UncertifiedError

MANIFEST = "manifest.json"
FORMAT_VERSIONS = (1, 2)  # manifest formats this runtime understands; 2 added preprocessing.crop
RESIZE = ("bilinear",)  # PIL filters this runtime implements, by manifest name
CROP = ("none", "center")  # none: stretch to the size; center: shorter side to the size, then the center square
COLOR = ("RGB",)
CERTIFIED = "certified"  # kdq's verdict when every gate passed; "rejected" and "not proven" are the others


@dataclass(frozen=True)
class Manifest:
    folder: Path
    input_name: str
    output_name: str
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float
    resize: str
    crop: str
    color: str
    classes: list[str]
    artifacts: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    @property
    def onnxruntime_config(self) -> dict[str, str]:
        """ONNX Runtime session config entries the export was certified with (`target.onnxruntime_config`)."""
        return {str(k): str(v) for k, v in self.raw.get("target", {}).get("onnxruntime_config", {}).items()}

    @property
    def certificate(self) -> dict[str, Any]:
        """What `kdq export` measured: verdict, the CPU it ran on (`measured_on`), the gates' report file."""
        return dict(self.raw.get("certificate") or {})

    @property
    def certificate_report(self) -> Path:
        """The certificate's gate-by-gate report (parity.json) in the export folder."""
        return self.folder / self.certificate.get("file", "parity.json")

    @property
    def verdict(self) -> str:
        """certified, rejected, not proven; "none" for an export made with `kdq export --no-verify`."""
        cert = self.certificate
        if not cert:
            return "none"
        return str(cert.get("verdict") or (CERTIFIED if cert.get("passed") else "rejected"))

    def require_certified(self) -> None:
        """Refuse an export whose certificate did not pass: its int8 model was never shown to match the float one."""
        if self.verdict == CERTIFIED:
            return
        why = (
            "it was exported without a certificate (--no-verify)"
            if self.verdict == "none"
            else (f"its certificate is {self.verdict} (see {self.certificate_report})")
        )
        raise UncertifiedError(f"{self.folder}: refusing to run an uncertified export: {why}; "
                               "pass --allow-uncertified to run it anyway")  # fmt: skip

    def artifact_path(self, fmt: str) -> Path:
        if fmt not in self.artifacts:
            have = ", ".join(sorted(self.artifacts)) or "none"
            raise ManifestError(f"{self.folder / MANIFEST}: the export has no {fmt} artifact (it has: {have})")
        return self.folder / self.artifacts[fmt]["file"]


def resolve_folder(model: Path | str) -> Path:
    """The export folder, given the folder itself or any file in it (manifest.json, model.onnx)."""
    path = Path(model)
    if not path.exists():
        raise ManifestError(f"{path}: no such model folder; pass the folder written by `kdq export ... --out DIR`")
    return path if path.is_dir() else path.parent


def load_manifest(model: Path | str) -> Manifest:
    """Read and validate DIR/manifest.json (no artifact is touched here; see `verified_bytes`)."""
    folder = resolve_folder(model)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{folder}: no {MANIFEST}; a model folder is what `kdq export CHECKPOINT --out DIR` writes "
            f"(model.onnx + {MANIFEST}). Without the manifest the preprocessing and class names are unknown."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not readable JSON ({e})") from e
    try:
        return _parse(folder, raw)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ManifestError(f"{path}: malformed manifest ({e.__class__.__name__}: {e})") from e


def _parse(folder: Path, raw: dict[str, Any]) -> Manifest:
    where = folder / MANIFEST
    version = raw.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this kdq-edge reads {list(FORMAT_VERSIONS)}); "
            "upgrade kdq-edge or re-export with a matching kdq"
        )
    inp, pre = raw["input"], raw["preprocessing"]
    if inp["layout"] != "NCHW" or inp["dtype"] != "float32":
        raise ManifestError(f"{where}: input {inp['layout']}/{inp['dtype']} is not supported (NCHW float32 is)")
    crop = pre["crop"] if version >= 2 else "none"  # format 1: every image stretched to the size
    if pre["resize"] not in RESIZE or pre["color"] not in COLOR or crop not in CROP:
        raise ManifestError(
            f"{where}: preprocessing resize={pre['resize']!r} crop={crop!r} color={pre['color']!r} is not supported "
            f"(resize: {', '.join(RESIZE)}; crop: {', '.join(CROP)}; color: {', '.join(COLOR)})"
        )
    height, width = (int(v) for v in pre["size"])
    if crop == "center" and height != width:
        raise ManifestError(f"{where}: crop 'center' needs a square size, got {pre['size']}")
    channels, in_h, in_w = inp["shape"][1:]
    if (channels, in_h, in_w) != (3, height, width):
        raise ManifestError(f"{where}: input shape {inp['shape']} disagrees with preprocessing size {pre['size']}")
    mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ManifestError(f"{where}: mean/std need 3 values each and std > 0, got {pre['mean']} / {pre['std']}")
    classes = [str(c) for c in raw["classes"]]
    if raw["output"]["shape"][-1] != len(classes):
        raise ManifestError(f"{where}: output shape {raw['output']['shape']} disagrees with {len(classes)} classes")
    return Manifest(
        folder=folder,
        input_name=inp["name"],
        output_name=raw["output"]["name"],
        height=height,
        width=width,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        scale=float(pre["scale"]),
        resize=pre["resize"],
        crop=crop,
        color=pre["color"],
        classes=classes,
        artifacts=dict(raw["artifacts"]),
        raw=raw,
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_bytes(manifest: Manifest, fmt: str = "onnx") -> bytes:
    """The artifact's bytes, read once and checked against the manifest's sha256 and size.

    The same bytes are then handed to the runtime, so the file cannot change between check and load.
    """
    path = manifest.artifact_path(fmt)
    record = manifest.artifacts[fmt]
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise IntegrityError(f"{path}: missing; the manifest lists it: copy the whole export folder") from e
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read ({e})") from e
    actual = sha256_bytes(data)
    if actual != record["sha256"] or ("bytes" in record and len(data) != record["bytes"]):
        raise IntegrityError(
            f"{path}: sha256 {actual[:16]}… ({len(data)} bytes) does not match the manifest "
            f"({record['sha256'][:16]}…, {record.get('bytes', '?')} bytes): the model file was modified or "
            "corrupted; copy the export folder again (refusing to load it)"
        )
    return data
