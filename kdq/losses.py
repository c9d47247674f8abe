"""Knowledge-distillation losses: Hinton et al. 2015 (KL) and DIST (Huang et al. 2022, Pearson correlation)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn

from kdq.config import KD_LOSSES, KD_WEIGHTINGS


def hinton_soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    return kl * (t * t)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """DIST: T^2 * [(1 - mean_i pearson(p_s[i, :], p_t[i, :])) + (1 - mean_c pearson(p_s[:, c], p_t[:, c]))].

    Matches the *relations* in the teacher's softened probabilities p = softmax(z/T), not their values: the
    inter-class term asks each image's ranking of the classes to correlate with the teacher's, the intra-class
    term asks each class's ranking of the batch's images to. Being invariant to the scale and shift of the
    teacher's outputs, it holds up when the teacher is much stronger than the student (Huang et al. 2022 report
    +0.5-1 pt over KL on CIFAR-100 and ImageNet). Inter and intra weigh the same (the paper's beta = gamma); the
    sum is blended with cross-entropy by kdq's alpha like Hinton's term (`KDLoss` weighting "blend"), or added to
    CE at weight alpha as the paper does (weighting "sum").

    Under torchrun each process holds a slice of the batch: the intra-class term gathers every rank's
    probabilities first (with autograd), so N processes compute the one-process loss.
    """
    t = temperature
    p_s, p_t = F.softmax(student / t, dim=1), F.softmax(teacher / t, dim=1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        p_s, p_t = torch.cat(dist_nn.all_gather(p_s)), torch.cat(dist_nn.all_gather(p_t))
    intra = 1 - _pearson_rows(p_s.T, p_t.T).mean()
    return (inter + intra) * (t * t)


SOFT_LOSSES = {"hinton": hinton_soft_loss, "dist": dist_soft_loss}


class KDLoss(nn.Module):
    """loss = alpha * soft(student, teacher, T) + (1 - alpha) * CE(s, y), soft = `kind`'s term (T^2-scaled).

    `weighting` "sum" gives CE(s, y) + alpha * soft instead: the form of the DIST paper (CE + beta * inter +
    gamma * intra, here beta = gamma = alpha), whose results were measured with CE at full weight.

    Shapes: student and teacher logits (N, C); targets (N,) class indices or (N, C) probabilities
    (CutMix/MixUp). The T^2 factor keeps the soft term's gradients on the hard term's scale when T
    changes. Both terms are computed in fp32 and returned separately so they can be logged.
    alpha = 0 is the plain supervised baseline (the teacher is then never needed).
    """

    def __init__(
        self,
        alpha: float = 0.7,
        temperature: float = 4.0,
        label_smoothing: float = 0.0,
        kind: str = "hinton",
        weighting: str = "blend",
    ):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kind not in KD_LOSSES:
            raise ValueError(f"unknown KD loss {kind!r}; choose from: {', '.join(KD_LOSSES)}")
        if weighting not in KD_WEIGHTINGS:
            raise ValueError(f"unknown KD weighting {weighting!r}; choose from: {', '.join(KD_WEIGHTINGS)}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self.hard_weight = 1.0 if weighting == "sum" else 1 - alpha
        self.soft_loss = SOFT_LOSSES[kind]

    def forward(
        self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        student = student.float()
        hard = F.cross_entropy(student, targets, label_smoothing=self.label_smoothing)
        if self.alpha == 0.0:
            return hard, torch.zeros_like(hard), hard
        if teacher is None:
            raise ValueError("alpha > 0 needs teacher logits")
        soft = self.soft_loss(student, teacher.float(), self.temperature)
        return self.alpha * soft + self.hard_weight * hard, soft, hard
