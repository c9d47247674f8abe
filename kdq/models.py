"""Teacher and student architectures for 32x32 images, built from torchvision and looked up by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.quantization.mobilenetv2 import QuantizableInvertedResidual, QuantizableMobileNetV2

from kdq.config import CIFAR_RESNETS, STUDENTS, TEACHERS

RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    name: getattr(resnet, name) for name in TEACHERS if name not in CIFAR_RESNETS
}


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (sec. 4.2): depth 6n+2, three stages of n basic blocks at 16, 32
    and 64 channels. ResNet-56 has 0.86 M parameters and 125 M MACs at 32x32 (ResNet-18: 11 M and 556 M), a
    teacher that trains in seconds on a CPU. Shortcuts that change shape are 1x1 conv + BN (option B; the paper
    used zero-padding, option A)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks, inplanes, layers = (depth - 2) // 6, 16, []
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage and not i else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(resnet.conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
                layers.append(resnet.BasicBlock(inplanes, planes, stride, down))
                inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(name: str, num_classes: int, pretrained: bool = False) -> resnet.ResNet:
    """torchvision ResNet with a CIFAR stem: 3x3 stride-1 first conv and no max-pool.

    With `pretrained`, ImageNet weights initialise everything but the stem and the classifier.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown teacher {name!r}; choose from: {', '.join(TEACHERS)}")
    model = RESNETS[name](weights="IMAGENET1K_V1" if pretrained else None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


class CifarMobileNetV2(QuantizableMobileNetV2):
    """MobileNetV2 for 32x32 inputs, ready for eager-mode int8 quantization, at output stride 16 or 8.

    Why it differs from torchvision's ImageNet model (output stride 32: 1x1 final maps at 32x32):
    - `output_stride=16` (`mobilenet_v2_os16`): stride-1 stem, 2x2 final maps, 24.5 M MACs; the fast one;
    - `output_stride=8` (`mobilenet_v2_os8`): the 24-channel stage at stride 1 too, 4x4 final maps, 88 M MACs:
      the layout of the published CIFAR MobileNetV2s (kuangliu/pytorch-cifar 94.43%, chenyaofo 93.79%);
    - ReLU instead of ReLU6: eager fusion has no conv-bn-ReLU6 pattern, and an unfused ReLU6 breaks
      the ONNX export of the int8 model (shared/notes/quantization.md);
    - dequantize *before* the classifier, which stays float: an int8 classifier puts logits on a
      coarse grid (many exact ties between runtimes).
    Residual additions are `FloatFunctional` and every conv-bn(-relu) is fusable (torchvision's
    `fuse_model`), inherited from `QuantizableMobileNetV2`.
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.1, output_stride: int = 16):
        super().__init__(
            num_classes=num_classes, width_mult=width_mult, dropout=dropout, block=QuantizableInvertedResidual
        )
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.features[0][0].stride = (1, 1)  # stem
        if output_stride == 8:
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


# Checkpoints written before the two student layouts had names call the output-stride-16 one this.
LEGACY_NAMES = {"mobilenet_v2": "mobilenet_v2_os16"}


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a teacher (`resnet*`) or a student (`mobilenet_v2_os16`, `mobilenet_v2_os8`) by name."""
    arch = LEGACY_NAMES.get(arch, arch)
    if arch in RESNETS:
        return cifar_resnet(arch, num_classes, **kwargs)
    if arch in CIFAR_RESNETS:
        return CifarResNet(int(arch.removeprefix("resnet")), num_classes, **kwargs)
    if arch in STUDENTS:
        return CifarMobileNetV2(num_classes, output_stride=int(arch.removeprefix("mobilenet_v2_os")), **kwargs)
    raise ValueError(f"unknown model {arch!r}; choose from: {', '.join(TEACHERS + STUDENTS)}")


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
