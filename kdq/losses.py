"""Knowledge-distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    """loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    Shapes: student and teacher logits (N, C); targets (N,) class indices or (N, C) probabilities
    (CutMix/MixUp). The T^2 factor keeps the soft term's gradients on the hard term's scale when T
    changes. Both terms are computed in fp32 and returned separately so they can be logged.
    alpha = 0 is the plain supervised baseline (the teacher is then never needed).
    """

    def __init__(self, alpha: float = 0.7, temperature: float = 4.0, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def forward(
        self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        student = student.float()
        hard = F.cross_entropy(student, targets, label_smoothing=self.label_smoothing)
        if self.alpha == 0.0:
            return hard, torch.zeros_like(hard), hard
        if teacher is None:
            raise ValueError("alpha > 0 needs teacher logits")
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher.float() / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        return self.alpha * soft + (1 - self.alpha) * hard, soft, hard
