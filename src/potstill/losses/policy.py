"""Sampled (policy-gradient) estimators: losses on tokens a model drew itself.

:func:`sampled_reverse_kl` is the per-token estimator of reverse KL(q ‖ p) on tokens sampled from
the student q: at each position the gradient of the full-vocabulary reverse KL is

    ∇ Σ_y q(y) (log q(y) − log p(y)) = E_{y~q} [(log q(y) − log p(y)) ∇ log q(y)]

(the Σ_y q ∇log q term is ∇Σ q = 0), so one sampled token gives an unbiased estimate of it:
REINFORCE with the per-token reverse KL as a negative advantage, no credit passed to later tokens
(the per-token reward with a zero discount of on-policy distillation as Thinking Machines
described it, 2025; MiniLLM, Gu et al. 2024, adds the later tokens' rewards). It needs only
log q(y) and log p(y) of the sampled token, not both distributions over the vocabulary.
"""

from __future__ import annotations

from torch import Tensor


def sampled_reverse_kl(student_logprob: Tensor, teacher_logprob: Tensor) -> Tensor:
    """(N,) log q(y), (N,) log p(y) of sampled tokens -> (N,) surrogate whose value is the
    single-sample estimate log q(y) − log p(y) and whose gradient (through ``student_logprob``
    only) is (log q(y) − log p(y)) ∇ log q(y)."""
    advantage = (student_logprob - teacher_logprob).detach()  # (N,) −advantage, in nats
    return advantage * (student_logprob - student_logprob.detach()) + advantage
