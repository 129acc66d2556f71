"""Knowledge distillation losses for the fine-tune after pruning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autocomp.train import LossFn


def logits_kd_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """Hinton et al. (2015): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft term's gradient scale independent of the temperature.
    """
    teacher.eval()

    def loss(student_logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        hard = nn.functional.cross_entropy(student_logits, y)
        if alpha == 0.0:
            return hard
        with torch.no_grad():
            teacher_logits = teacher(x)
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(student_logits / temperature, dim=1),
            nn.functional.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean", log_target=True,
        )
        return alpha * temperature**2 * soft + (1.0 - alpha) * hard

    return loss
