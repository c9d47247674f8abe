"""kdq-edge: run a `kdq export` folder without PyTorch.

    from kdq_edge import load_model
    model = load_model("export-x86")              # reads manifest.json, checks model.onnx's sha256
                                                  # (and refuses an export whose certificate did not pass)
    result = model.classify_paths(["cat.png"])[0]  # training preprocessing, ONNX Runtime int8
    print(result.top[0].label, result.top[0].probability)

Depends only on onnxruntime, numpy and pillow.
"""

from kdq_edge.errors import EdgeError, ImageError, IntegrityError, ManifestError, UncertifiedError
from kdq_edge.image import load_image, preprocess
from kdq_edge.manifest import Manifest, load_manifest
from kdq_edge.model import EdgeModel, Prediction, Result, load_model

__version__ = "0.1.0"
__all__ = [
    "EdgeError",
    "EdgeModel",
    "ImageError",
    "IntegrityError",
    "Manifest",
    "ManifestError",
    "Prediction",
    "Result",
    "UncertifiedError",
    "load_image",
    "load_manifest",
    "load_model",
    "preprocess",
]
