"""Losses: pure functions of tensors and scalars (they never see a recipe).

``fused_distill_loss`` is the public entry point for other trainers: the distillation loss from
hidden states and LM heads, chunked so that no ``[tokens, vocab]`` logits tensor ever exists.
"""

from potstill.losses.divergences import DIVERGENCES, check_divergence_args, divergence
from potstill.losses.fused import auto_chunk_size, fused_distill_loss, fused_distill_sums
from potstill.losses.objective import (
    HARD,
    SOFT,
    LossSums,
    cross_entropy,
    distillation_loss,
    distillation_sums,
    masked_sum,
    mix,
    normalise,
    step_normalizer,
    valid_mask,
)
from potstill.losses.policy import later_mean, reinforce, sampled_reverse_kl

__all__ = [
    "DIVERGENCES",
    "HARD",
    "SOFT",
    "LossSums",
    "auto_chunk_size",
    "check_divergence_args",
    "cross_entropy",
    "distillation_loss",
    "distillation_sums",
    "divergence",
    "fused_distill_loss",
    "fused_distill_sums",
    "later_mean",
    "masked_sum",
    "mix",
    "normalise",
    "reinforce",
    "sampled_reverse_kl",
    "step_normalizer",
    "valid_mask",
]
