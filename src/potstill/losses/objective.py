"""The one place where per-token losses are masked, mixed and normalised.

Reduction rule (exact under gradient accumulation and data parallelism): a method's loss is a
*sum* over the valid tokens of its micro-batch (:class:`LossSums`); the training loop divides it
once, by the number of valid tokens in the *whole optimizer step* (all micro-batches, all
processes; :func:`step_normalizer`, :func:`normalise`). Summing the micro-batch losses of a step
then gives the mean over the step's tokens, however the tokens were split.

Weights are applied in one place too: :func:`mix` turns unweighted term sums into the objective
(``soft_weight · soft + hard_weight · hard + …``). The fused engine is the one caller that also
needs the weights inside — it computes the weighted gradient while it computes the value — and it
gets them from the same weights mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.divergences import divergence

HARD = "hard"  # the cross-entropy term on the data's labels: one name in every method's log
SOFT = "soft"  # the divergence to the teacher (methods with several soft terms name each)


@dataclass
class LossSums:
    """A micro-batch's loss before normalisation.

    ``loss`` is the differentiable weighted sum over the micro-batch's valid tokens; ``terms``
    are the unweighted sums of each term (detached), for the log. Both are divided by the step's
    token count in :func:`normalise`, nowhere else.
    """

    loss: Tensor  # () fp32
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> () fp32, detached


def valid_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(…) bool: positions that carry a label."""
    return labels != ignore_index


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ of ``per_token`` over ``mask``; no data-dependent branch: an all-masked batch gives
    exactly 0 with finite, zero gradients."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


def mix(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``Σ weights[k] · terms[k]`` over the terms with a non-zero weight."""
    total = None
    for name, weight in weights.items():
        if weight:
            part = weight * terms[name]
            total = part if total is None else total + part
    if total is None:  # every weight is 0: a zero that still carries the graph's device/dtype
        total = next(iter(terms.values())) * 0.0
    return total


def weighted_sums(terms: dict[str, Tensor], weights: dict[str, float], like: Tensor) -> LossSums:
    """``LossSums`` of unweighted term sums and their weights (:func:`mix`, terms detached for
    the log); with no term, a zero still tied to ``like``'s graph, so backward runs."""
    if not terms:
        return LossSums(like.sum().float() * 0.0)
    return LossSums(mix(terms, weights), {k: v.detach() for k, v in terms.items()})


def step_normalizer(valid_tokens: Tensor | int, num_processes: int = 1) -> Tensor:
    """The divisor of one optimizer step's micro-batch sums: its valid tokens over all
    micro-batches and processes, at least 1, divided by the number of processes (DDP averages
    gradients over processes, so each process divides by its share). The clamp comes before the
    division: a step with one valid token on two processes divides by 0.5, not by 1."""
    count = torch.as_tensor(valid_tokens, dtype=torch.float32)
    return count.float().clamp_min(1) / num_processes


def normalise(sums: LossSums, normalizer: Tensor | float) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, terms)`` divided by ``normalizer`` (see :func:`step_normalizer`)."""
    if not isinstance(normalizer, Tensor):
        normalizer = torch.tensor(float(normalizer))
    normalizer = normalizer.to(device=sums.loss.device, dtype=torch.float32)
    terms = {k: (v.detach() / normalizer) for k, v in sums.terms.items()}
    return sums.loss / normalizer, terms


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy on hard labels, fp32, 0 where ``labels == ignore_index``.

    student_logits (..., V), labels (...) -> (...)
    """
    flat = student_logits.reshape(-1, student_logits.shape[-1]).float()  # (N, V)
    ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return ce.reshape(labels.shape)


def distillation_sums(
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
) -> LossSums:
    """``soft_weight · divergence + hard_weight · cross-entropy``, summed over valid tokens
    (the naive reference of the fused engine: it holds the full logits).

    student_logits (…, V) (gradients flow); teacher_logits (…, V) or None when there is no soft
    term (plain fine-tuning: ``hard_weight=1``); labels (…) already shifted.
    """
    mask = valid_mask(labels, ignore_index)  # (…)
    terms: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    if teacher_logits is not None and soft_weight != 0.0:
        per_token = divergence(
            student_logits, teacher_logits, kind, temperature=temperature, beta=beta, alpha=alpha
        )  # (…)
        terms[SOFT], weights[SOFT] = masked_sum(per_token, mask), soft_weight
    if hard_weight != 0.0:
        per_token = cross_entropy(student_logits, labels, ignore_index=ignore_index)  # (…)
        terms[HARD], weights[HARD] = masked_sum(per_token, mask), hard_weight
    return weighted_sums(terms, weights, student_logits)


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
    """:func:`distillation_sums`, normalised: the mean over valid tokens by default.

    Args:
        normalizer: valid tokens of the whole optimizer step; default: of this batch (≥ 1).

    Returns:
        ``(loss, terms)`` — the scalar to backpropagate and the detached, equally normalised
        ``soft`` / ``hard`` terms for logging.
    """
    sums = distillation_sums(
        student_logits,
        teacher_logits,
        labels,
        kind=kind,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
    )
    if normalizer is None:
        normalizer = step_normalizer(valid_mask(labels, ignore_index).sum())
    return normalise(sums, normalizer)
