"""Losses: pure functions of tensors and scalars (they never see a recipe)."""

from potstill.losses.divergences import DIVERGENCES, check_divergence_args, divergence
from potstill.losses.objective import cross_entropy, distillation_loss, normalise, valid_mask

__all__ = [
    "DIVERGENCES",
    "check_divergence_args",
    "cross_entropy",
    "distillation_loss",
    "divergence",
    "normalise",
    "valid_mask",
]
