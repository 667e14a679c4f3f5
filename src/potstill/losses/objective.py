"""The one place where per-token losses are masked, mixed and normalised.

Reduction rule (exact under gradient accumulation and data parallelism): every term is summed over
the valid tokens of the micro-batch and divided by ``normalizer``, the number of valid tokens in the
*whole optimizer step* (all micro-batches, all processes). Summing the micro-batch losses of a step
then gives the mean over the step's tokens, however the tokens were split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.divergences import divergence


def valid_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(…) bool: positions that carry a label."""
    return labels != ignore_index


def normalise(per_token: Tensor, mask: Tensor, normalizer: Tensor | float | None = None) -> Tensor:
    """Σ over valid tokens ÷ ``normalizer`` (default: this batch's valid-token count).

    No data-dependent branch: an all-masked batch gives exactly 0 with finite, zero gradients.
    """
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    if normalizer is None:
        normalizer = mask.sum()
    if isinstance(normalizer, Tensor):
        return total / normalizer.to(total.dtype).clamp_min(1)
    return total / max(float(normalizer), 1.0)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy on hard labels, fp32, 0 where ``labels == ignore_index``.

    student_logits (..., V), labels (...) -> (...)
    """
    flat = student_logits.reshape(-1, student_logits.shape[-1]).float()  # (N, V)
    ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return ce.reshape(labels.shape)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    normalizer: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``soft_weight · divergence + hard_weight · cross-entropy``, normalised once.

    Args:
        student_logits: (…, V) student logits (gradients flow).
        teacher_logits: (…, V) teacher logits, or ``None`` when there is no soft term
            (plain fine-tuning: ``hard_weight=1``).
        labels: (…) target ids, already shifted (position t predicts token t+1).
        normalizer: valid tokens of the whole optimizer step; default: of this batch.

    Returns:
        ``(loss, terms)`` — the scalar to backpropagate and the detached, equally normalised
        ``soft`` / ``hard`` terms for logging.
    """
    mask = valid_mask(labels, ignore_index)  # (…)
    terms: dict[str, Tensor] = {}
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits is not None and soft_weight != 0.0:
        per_token = divergence(
            student_logits, teacher_logits, kind, temperature=temperature, beta=beta, alpha=alpha
        )  # (…)
        soft = normalise(per_token, mask, normalizer)
        terms["soft"] = soft.detach()
        loss = loss + soft_weight * soft
    if hard_weight != 0.0:
        per_token = cross_entropy(student_logits, labels, ignore_index=ignore_index)  # (…)
        hard = normalise(per_token, mask, normalizer)
        terms["hard"] = hard.detach()
        loss = loss + hard_weight * hard
    return loss, terms
