"""Sampled (policy-gradient) estimators: losses on tokens a model drew itself.

:func:`sampled_reverse_kl` is the per-token estimator of reverse KL(q ‖ p) on tokens sampled from
the student q: at each position the gradient of the full-vocabulary reverse KL is

    ∇ Σ_y q(y) (log q(y) − log p(y)) = E_{y~q} [(log q(y) − log p(y)) ∇ log q(y)]

(the Σ_y q ∇log q term is ∇Σ q = 0), so one sampled token gives an unbiased estimate of it:
REINFORCE with the per-token reverse KL as a negative advantage, no credit passed to later tokens
(the per-token reward with a zero discount of on-policy distillation as Thinking Machines
described it, 2025; MiniLLM, Gu et al. 2024, adds the later tokens' rewards). It needs only
log q(y) and log p(y) of the sampled token, not both distributions over the vocabulary.

:func:`later_mean` passes that credit on: MiniLLM's long-term term gives each sampled token the
reverse KL of the tokens sampled after it, and normalises it by their number (its "length
normalisation", Gu et al. 2024, §2.2), without which a sum of positive per-token costs rewards
short samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reinforce(logprob: Tensor, cost: Tensor) -> Tensor:
    """(N,) log-probabilities of sampled tokens, (N,) their costs -> (N,) surrogate whose value
    is the cost and whose gradient is cost · ∇ log-probability (the cost is not differentiated)."""
    cost = cost.detach()
    return cost * (logprob - logprob.detach()) + cost


def sampled_reverse_kl(student_logprob: Tensor, teacher_logprob: Tensor) -> Tensor:
    """(N,) log q(y), (N,) log p(y) of sampled tokens -> (N,) surrogate whose value is the
    single-sample estimate log q(y) − log p(y) and whose gradient (through ``student_logprob``
    only) is (log q(y) − log p(y)) ∇ log q(y)."""
    return reinforce(student_logprob, student_logprob - teacher_logprob)


def later_mean(values: Tensor, mask: Tensor, *, normalise: bool = True) -> Tensor:
    """(B, T) per-token values, (B, T) bool mask -> (B, T): at each position, the mean of the
    row's values at masked positions after it (the sum without ``normalise``); 0 where none is."""
    v = torch.where(mask, values, torch.zeros_like(values))
    later = v.flip(-1).cumsum(-1).flip(-1) - v  # (B, T) Σ over t' > t
    if not normalise:
        return later
    m = mask.to(values.dtype)
    count = m.flip(-1).cumsum(-1).flip(-1) - m  # (B, T) masked positions after t
    return later / count.clamp_min(1)
