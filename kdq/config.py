"""Recipes as data: one `Preset` per job family (files in `recipes/`, read by `kdq.presets`), overridable
from the CLI.

A preset is everything that decides a result (data, architectures, optimisation, distillation),
so it is stored verbatim in every checkpoint and export manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

# The choices the CLI offers, here (not beside their code) so that `kdq --help` needs no torch import.
DATASETS = ("digits", "fashion-mnist", "fashion-mnist-small", "cifar10", "cifar100", "folder")
# He et al. 2016 (sec. 4.2): the CPU-sized teachers of the KD literature's tables
CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet56")
TEACHERS = (*CIFAR_RESNETS, "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# MobileNetV2 in two layouts (kdq.models says more): mobilenet_v2 strides all but the stem up to 64 px (2x2 final
# maps at 32 px, 24.5 M MACs); mobilenet_v2_hires also keeps the 24-channel stage at stride 1, final maps 2x finer at
# any size (4x4 at 32 px, 88 M MACs): the layout of every published CIFAR MobileNetV2 (kuangliu 94.4%, chenyaofo 93.8%).
MOBILENET_STUDENTS = ("mobilenet_v2", "mobilenet_v2_hires")  # at any width (`student_width`)
# ... and the shallow CIFAR ResNets: dense int8 convolutions, no depthwise ones (`kdq plan` times them all).
STUDENTS = (*MOBILENET_STUDENTS, "resnet8", "resnet14", "resnet20")
# Input size and stem (kdq.models): up to CIFAR_STEM_MAX px a model keeps every pixel through its first layer
# (CIFAR stem: ResNet 3x3 stride-1 conv without max-pool, MobileNetV2 stride-1 first conv); above it, the ImageNet
# stem (ResNet 7x7 stride-2 conv + max-pool, MobileNetV2 stride-2 conv) quarters the pixels first, as torchvision's
# ImageNet models do at 224. 64 is where the two meet: a 96 px image after the ImageNet stem of a ResNet is 24x24,
# close to the 32x32 the CIFAR stem sees, while a CIFAR stem at 96 px costs 9x the MACs of 32 px.
CIFAR_STEM_MAX = 64


def stem_for(image_size: int) -> str:
    return "cifar" if image_size <= CIFAR_STEM_MAX else "imagenet"


SCHEDULES = ("onecycle", "cosine")  # per-step learning-rate schedules (kdq.train.make_scheduler)
KD_LOSSES = ("hinton", "dist")  # kdq.losses: Hinton et al. 2015; DIST, Huang et al. 2022
# How the soft term meets cross-entropy (kdq.losses.KDLoss): "blend", alpha * soft + (1 - alpha) * CE (Hinton et
# al.); "sum", CE + alpha * soft (Huang et al.'s DIST: CE + beta * inter + gamma * intra, beta = gamma = alpha).
KD_WEIGHTINGS = ("blend", "sum")
# int8 backends of each quantization flow (kdq.quant): x86 (servers, laptops); for ARM, the eager flow's qnnpack
# engine or the pt2e flow's XNNPACK (ExecuTorch).
FLOW_BACKENDS = {"eager": ("x86", "qnnpack"), "pt2e": ("x86", "xnnpack")}
FLOWS = tuple(FLOW_BACKENDS)
QAT_STAGE = "student_qat"  # where the eager flow's QAT writes under RUN


def qat_stage(flow: str, backend: str) -> str:
    """Where QAT writes under RUN: the PT2E flow's students get their own folders (student_qat_pt2e_x86, ...), so
    one run holds the eager and PT2E int8 students, and their exports, side by side."""
    return QAT_STAGE if flow == "eager" else f"{QAT_STAGE}_{flow}_{backend}"


BACKENDS = ("x86", "qnnpack", "xnnpack")
CHECKPOINT = "checkpoint.pt"  # every stage writes RUN/<stage>/checkpoint.pt
ONECYCLE_MOMENTUM_SWING = 0.05  # 1cycle moves SGD momentum this much either side of Optim.momentum (kdq.train)


@dataclass(frozen=True)
class Optim:
    """One training stage's optimisation recipe (SGD + Nesterov, per-step schedule)."""

    epochs: int
    lr: float  # peak learning rate for a batch of `batch_size`
    batch_size: int = 128  # global batch, split across DDP ranks
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "onecycle"  # "onecycle" or "cosine"
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping: epochs without a better validation accuracy; 0 = off

    def __post_init__(self):
        """However the recipe was made (a file, a CLI option, code): 1cycle must keep momentum within [0, 1)."""
        swing = ONECYCLE_MOMENTUM_SWING
        if self.schedule == "onecycle" and not swing <= self.momentum < 1 - swing:
            raise ValueError(
                f"momentum: {self.momentum!r} with the onecycle schedule, which cycles it by ±{swing}, leaves [0, 1) "
                f"(must be in [{swing}, {1 - swing}) for onecycle)"
            )


@dataclass(frozen=True)
class Augment:
    """Batched, on-device augmentation. A transform is applied only when its setting is non-zero."""

    crop_padding: int = 4  # random translation of up to this many pixels (reflect padding)
    flip: bool = True  # horizontal flip with p=0.5 (off for digits: a mirrored 2 is not a 2)
    cutmix_alpha: float = 0.0
    mixup_alpha: float = 0.0


@dataclass(frozen=True)
class Quant:
    """int8 recipe: static PTQ calibration and QAT fine-tuning (with distillation)."""

    flow: str = "eager"  # "eager" (torch.ao.quantization) or "pt2e" (torch.export + torchao); kdq.quant
    backend: str = "x86"  # x86 (servers, laptops); ARM: qnnpack (eager flow), xnnpack (pt2e flow, ExecuTorch)
    activation_bits: int | None = None  # None: the flow and backend's default (kdq.quant.DEFAULT_BITS)
    weight_bits: int | None = None  # None: the flow and backend's default (kdq.quant.DEFAULT_BITS)
    calibration_batches: int = 100  # PTQ: training batches the observers see (seed: CALIBRATION_BATCHES)
    qat_optim: Optim = field(default_factory=lambda: Optim(epochs=5, lr=0.01, schedule="cosine"))
    freeze_bn_after: float = 0.6  # fraction of QAT epochs after which BN statistics are frozen
    freeze_observers_after: float = 0.8  # ... and after which quantization ranges stop moving


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str  # a name from DATASETS
    teacher: str  # a name from kdq.models.TEACHERS
    image_size: int = 32  # square model input, px: every dataset is resized to it once at load time (kdq.data)
    student: str = "mobilenet_v2"
    # Where training starts: "" (random init), "imagenet" (torchvision's ImageNet weights: downloaded once into
    # the torch hub cache, read from it offline) or the path of a state_dict file (`kdq.models.load_start_weights`).
    teacher_weights: str = ""
    student_weights: str = ""
    student_width: float = 1.0
    student_dropout: float = 0.1
    teacher_optim: Optim = field(default_factory=lambda: Optim(epochs=50, lr=0.05))
    student_optim: Optim = field(default_factory=lambda: Optim(epochs=20, lr=0.05))
    augment: Augment = field(default_factory=Augment)
    quant: Quant = field(default_factory=Quant)
    temperature: float = 4.0  # Hinton et al.: softened teacher distribution
    alpha: float = 0.7  # weight of the soft (teacher) term; 0 = plain supervised baseline
    kd_loss: str = "hinton"  # the soft term: "hinton" (KL of softened distributions) or "dist" (kdq.losses)
    kd_weighting: str = "blend"  # KD_WEIGHTINGS: alpha blends the soft term with CE, or weighs it added to CE
    # Online: the teacher runs on the student's own augmented batch (Beyer et al. 2022, "consistent" teaching);
    # offline: its logits on the unaugmented images, computed once (RUN/soft_targets.pt).
    kd_online: bool = False
    seed: int = 0
    # Held out of the training split (stratified, by `seed`) for early stopping, best-epoch selection and every
    # per-epoch number; the test split is read only by the final evaluation, the certificate and the report.
    val_fraction: float = 0.1
    # Train on a stratified subset of this many training images (fixed, drawn before the validation split);
    # 0 = all of them. For benchmarks that must fit a CPU budget; the test split is always whole.
    train_subset: int = 0

    def __post_init__(self):
        """However the recipe was made (a file, a CLI option, code): a width applies to MobileNetV2 students only,
        refused here, before any stage trains (a CIFAR ResNet student has one width)."""
        if self.student not in MOBILENET_STUDENTS and self.student_width != 1.0:
            raise ValueError(f"student_width applies to MobileNetV2 students; {self.student} has one width "
                             f"(got {self.student_width:g})")  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        d = dict(d)
        d["teacher_optim"] = Optim(**d["teacher_optim"])
        d["student_optim"] = Optim(**d["student_optim"])
        d["augment"] = Augment(**d["augment"])
        if "quant" in d:
            d["quant"] = Quant(**{**d["quant"], "qat_optim": Optim(**d["quant"]["qat_optim"])})
        return cls(**d)


R = TypeVar("R", Preset, Optim, Quant)


def with_overrides(recipe: R, **changes) -> R:
    """A copy of `recipe` with the fields given replaced; None keeps the recipe's value."""
    return dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})
