"""Teacher and student architectures, built from torchvision and looked up by name; a CIFAR stem up to 64 px
input, the ImageNet stem above (`kdq.config.stem_for`)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import get_model_weights, resnet
from torchvision.models.quantization.mobilenetv2 import QuantizableInvertedResidual, QuantizableMobileNetV2
from torchvision.models.quantization.resnet import QuantizableBasicBlock
from torchvision.models.quantization.utils import _fuse_modules

from kdq.config import CIFAR_RESNETS, MOBILENET_STUDENTS, STUDENTS, TEACHERS
from kdq.errors import KdqError

RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    name: getattr(resnet, name) for name in TEACHERS if name not in CIFAR_RESNETS
}


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (sec. 4.2): depth 6n+2, three stages of n basic blocks at 16, 32
    and 64 channels. ResNet-56 has 0.86 M parameters and 125 M MACs at 32x32 (ResNet-18: 11 M and 556 M), a
    teacher that trains in seconds on a CPU. Shortcuts that change shape are 1x1 conv + BN (option B; the paper
    used zero-padding, option A).

    Ready for eager int8 like the student, so that a teacher can be quantized itself (the baseline any student
    must beat) and a shallow one (`resnet8`, `resnet14`) can be a student: quant/dequant stubs (identities in
    float), torchvision's quantizable basic block (residual add + ReLU as one `FloatFunctional`), `fuse_model`,
    and a float classifier after the dequantize. Its state_dict is the plain network's."""

    def __init__(self, depth: int, num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks, inplanes, layers = (depth - 2) // 6, 16, []
        stride = 2 if _check_stem(stem) == "imagenet" else 1
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True), *([nn.MaxPool2d(3, 2, 1)] if stride == 2 else []))  # fmt: skip
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage and not i else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(resnet.conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
                layers.append(QuantizableBasicBlock(inplanes, planes, stride, down))
                inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    head_name = "fc"  # the classifier's module path, which PT2E quantizers name (`kdq.pt2e`)
    # TorchScript compiles properties too, and an int8 model's fc can be a Linear of another (mangled) type than the
    # annotation names: the property is Python-side only.
    __jit_unused_properties__ = ["classifier"]

    @property
    def classifier(self) -> nn.Linear:
        """The layer that stays float in int8 (`kdq.quant`), under the student's name for it."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.quant(x)))
        return self.fc(self.dequant(F.adaptive_avg_pool2d(x, 1).flatten(1)))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        _fuse_modules(self.stem, ["0", "1", "2"], is_qat, inplace=True)
        for block in self.layers:
            block.fuse_model(is_qat)


def _check_stem(stem: str) -> str:
    if stem not in STEMS_BY_NAME:
        raise ValueError(f"unknown stem {stem!r}; choose from: {', '.join(STEMS_BY_NAME)}")
    return stem


def cifar_resnet(name: str, num_classes: int, stem: str = "cifar") -> resnet.ResNet:
    """torchvision ResNet; with the CIFAR stem (`kdq.config.stem_for`): 3x3 stride-1 first conv and no max-pool."""
    if name not in RESNETS:
        raise ValueError(f"unknown teacher {name!r}; choose from: {', '.join(TEACHERS)}")
    model = RESNETS[name](weights=None)
    if _check_stem(stem) == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


class CifarMobileNetV2(QuantizableMobileNetV2):
    """MobileNetV2 ready for eager-mode int8 quantization, in two layouts named by what holds at every input size.

    - `mobilenet_v2`: torchvision's strides, except the stem's up to 64 px (the CIFAR stem, stride 1): output
      stride 16 there (2x2 final maps and 24.5 M MACs at 32 px), torchvision's 32 above; the fast one;
    - `mobilenet_v2_hires` (`hires=True`): also the 24-channel stage's first block at stride 1, so its final maps
      are 2x finer than `mobilenet_v2`'s at any size (4x4 at 32 px, 88 M MACs: ~3.6x), the same parameters: the
      layout of the published CIFAR MobileNetV2s (kuangliu/pytorch-cifar 94.43%, chenyaofo 93.79%);
    - ReLU instead of ReLU6: eager fusion has no conv-bn-ReLU6 pattern, and an unfused ReLU6 breaks
      the ONNX export of the int8 model (shared/notes/quantization.md);
    - dequantize *before* the classifier, which stays float: an int8 classifier puts logits on a
      coarse grid (many exact ties between runtimes).
    Residual additions are `FloatFunctional` and every conv-bn(-relu) is fusable (torchvision's
    `fuse_model`), inherited from `QuantizableMobileNetV2`.
    """

    head_name = "classifier"  # the classifier's module path, which PT2E quantizers name (`kdq.pt2e`)

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.1, hires: bool = False,
        stem: str = "cifar",
    ):  # fmt: skip
        super().__init__(
            num_classes=num_classes, width_mult=width_mult, dropout=dropout, block=QuantizableInvertedResidual
        )
        if _check_stem(stem) == "cifar":  # the ImageNet stem keeps torchvision's stride 2 (output stride x2)
            self.features[0][0].stride = (1, 1)
        if hires:
            self.features[2].conv[1][0].stride = (1, 1)  # depthwise conv of the 24-channel stage's first block
        _relu6_to_relu(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.quant(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(self.dequant(x))


def _relu6_to_relu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(module, name, nn.ReLU(inplace=False))
        else:
            _relu6_to_relu(child)


# Names of the student layouts in checkpoints and results written before 2026-12-03: by their output stride at
# 32 px, which is not theirs above 64 px (the ImageNet stem doubles it).
LEGACY_NAMES = {"mobilenet_v2_os16": "mobilenet_v2", "mobilenet_v2_os8": "mobilenet_v2_hires"}


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a teacher (`resnet*`) or a student (`mobilenet_v2`, `mobilenet_v2_hires`) by name."""
    arch = LEGACY_NAMES.get(arch, arch)
    if arch in RESNETS:
        return cifar_resnet(arch, num_classes, **kwargs)
    if arch in CIFAR_RESNETS:
        return CifarResNet(int(arch.removeprefix("resnet")), num_classes, **kwargs)
    if arch in MOBILENET_STUDENTS:
        return CifarMobileNetV2(num_classes, hires=arch == "mobilenet_v2_hires", **kwargs)
    raise ValueError(f"unknown model {arch!r}; choose from: {', '.join(dict.fromkeys(TEACHERS + STUDENTS))}")


def count_parameters(model: nn.Module) -> int:
    """Trainable numbers in a float model, or weights and biases of an int8 one.

    Converted int8 layers keep their weights packed (`weight()` / `bias()` methods, not parameters); a PT2E
    int8 graph keeps them as int8 buffers, beside per-channel `_scale_N` / `_zero_point_N` (not counted).
    """
    if isinstance(model, torch.fx.GraphModule):
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return sum(t.numel() for name, t in tensors if not name.startswith(("_scale", "_zero_point")))
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if callable(getattr(m, "weight", None)):
            bias = m.bias()
            n += m.weight().numel() + (bias.numel() if bias is not None else 0)
    return n


def model_macs(model: nn.Module, image_size: int = 32) -> dict:
    """MACs of one image through `model`, total and per operator (FlopCounterMode reports FLOPs = 2 x MACs)."""
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, image_size, image_size))
    per_op = {str(op).removeprefix("aten."): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"macs_per_image": counter.get_total_flops() // 2, "per_op": per_op}


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one image through `model` (the same for its int8 and fp32 forms)."""
    return model_macs(model, image_size)["macs_per_image"]


# --- pretrained starts ------------------------------------------------------------------------------

# torchvision's ImageNet model each architecture's weights come from; the CIFAR ResNets have none.
IMAGENET_MODELS = {**{name: name for name in RESNETS}, **{name: "mobilenet_v2" for name in MOBILENET_STUDENTS}}
# The stem of each family: up to 64 px kdq uses a CIFAR stem (ResNet: 3x3 stride-1 conv instead of 7x7 stride-2
# conv + max-pool; MobileNetV2: its 3x3 conv at stride 1 instead of 2), which sees pixels at another scale
# than the ImageNet stem did, so the stem (conv and its batch norm) starts from a fresh init. Above 64 px the
# models keep the ImageNet stem, and its pretrained weights load like the rest.
STEMS = ("conv1.", "bn1.", "features.0.")
STEMS_BY_NAME = ("cifar", "imagenet")


class WeightsError(KdqError):
    """Start weights that cannot be had or do not fit the architecture."""


def start_weights(arch: str, source: str) -> dict[str, torch.Tensor]:
    """The state_dict `source` names: "imagenet" (torchvision's weights, through the torch hub cache) or a file."""
    if source == "imagenet":
        if arch not in IMAGENET_MODELS:
            raise WeightsError(f"{arch} has no ImageNet weights in torchvision; start from a file with --weights")
        weights = get_model_weights(IMAGENET_MODELS[arch]).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=False)
        except (OSError, URLError) as e:  # offline, and not in the hub cache yet
            raise WeightsError(
                f"ImageNet weights of {IMAGENET_MODELS[arch]} are not in the torch hub cache ({torch.hub.get_dir()}) "
                f"and cannot be downloaded ({e}): fetch {weights.url} there, or pass --weights FILE"
            ) from e
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {source} not found") from None
    except Exception as e:  # not a torch file, or not tensors only
        raise WeightsError(f"{source}: not a weights file torch.load can read safely ({e.__class__.__name__})") from e
    state = state.get("model", state) if isinstance(state, dict) else state  # a kdq checkpoint holds it as "model"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: expected a state_dict (names -> tensors)")
    return state


def model_stem(model: nn.Module) -> str:
    """ "cifar" or "imagenet": whether the first conv keeps every pixel (stride 1)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return "cifar" if first.stride == (1, 1) else "imagenet"


def load_start_weights(model: nn.Module, arch: str, source: str) -> list[str]:
    """Copy every tensor of `source` whose name and shape match into `model`, except the stem's (see STEMS).

    Returns the names left at their fresh init (the stem, a classifier of another class count...)."""
    state = start_weights(arch, source)
    own = model.state_dict()
    fresh_stem = STEMS if model_stem(model) == "cifar" else ()
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape and not k.startswith(fresh_stem)}
    body = [k for k in own if not k.startswith(fresh_stem) and k.endswith("weight")]
    if sum(k in fits for k in body) < 0.9 * len(body):  # all but a classifier of another class count
        raise WeightsError(
            f"no weights of {source} fit {arch}: {sum(k in fits for k in body)} of its {len(body)} weight tensors "
            "match by name and shape (a different architecture or width?)"
        )
    model.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))
