"""Training preprocessing, without torch: decode → RGB → resize (PIL bilinear) → crop → (pixel / 255 - mean) / std.

kdq reads class folders with `Image.open(p).convert("RGB")` and torchvision's `Resize(S)` + `CenterCrop(S)`
(`kdq.data.fit_image`: the shorter side becomes S with Pillow's bilinear filter, then the center S x S), and
normalizes uint8 tensors in float32; the same operations here, in Pillow, give bit-identical model inputs.
Manifests without `crop` (older exports) stretch the image to the size instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdq_edge.errors import ImageError
from kdq_edge.manifest import Manifest

ALPHA_POLICIES = ("refuse", "drop")


def has_transparency(im: Image.Image) -> bool:
    """True when some pixel is not fully opaque (an alpha band or a palette/tRNS transparency)."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


def load_image(path: Path | str, alpha: str = "refuse") -> tuple[Image.Image, str]:
    """Decode `path` and convert it to RGB as training did; returns (RGB image, original mode).

    Grayscale, palette and CMYK images are converted (`convert("RGB")`, as kdq did on the training images).
    An image with transparent pixels is refused unless `alpha="drop"`: convert("RGB") keeps whatever colour
    hides under the transparent pixels, which is rarely what the picture shows. A fully opaque RGBA image
    converts losslessly.
    """
    if alpha not in ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {ALPHA_POLICIES}, got {alpha!r}")
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if alpha == "refuse" and has_transparency(im):
                raise ImageError(
                    f"{path}: {mode} image with transparent pixels; the model was trained on opaque RGB images. "
                    "Flatten it onto a background first, or pass --alpha drop to discard alpha as training did"
                )
            return im.convert("RGB"), mode
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise ImageError(f"{path}: is a folder") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from e


def fit_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)` arithmetic: the shorter side becomes `size`, the longer one scales (truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(im: Image.Image, manifest: Manifest) -> np.ndarray:
    """RGB image → uint8 (3, H, W) at the model's input size (bilinear: load_manifest refuses any other)."""
    if manifest.crop == "center":
        size = manifest.width
        w, h = fit_size(*im.size, size)
        if (w, h) != im.size:  # torchvision leaves an image already at that size untouched
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision's CenterCrop
        small = im.crop((left, top, left + size, top + size))
    else:
        small = im.resize((manifest.width, manifest.height), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)


def normalize(pixels: np.ndarray, manifest: Manifest) -> np.ndarray:
    """uint8 (N, 3, H, W) → float32 (N, 3, H, W): (pixel / 255 - mean[c]) / std[c], computed in float32."""
    mean = np.asarray(manifest.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(manifest.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = pixels.astype(np.float32) / np.float32(1.0 / manifest.scale)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess(paths: list[Path | str], manifest: Manifest, alpha: str = "refuse") -> np.ndarray:
    """Images → model input float32 (N, 3, H, W); raises ImageError on the first bad image."""
    return normalize(np.stack([resize(load_image(p, alpha)[0], manifest) for p in paths]), manifest)


def write_ppm(im: Image.Image, out: Path | str) -> None:
    """Binary PPM (P6, maxval 255): the image format the C++ apps read without any library."""
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    h, w, _ = rgb.shape
    with open(out, "wb") as f:
        f.write(f"P6\n{w} {h}\n255\n".encode("ascii"))
        f.write(rgb.tobytes())
