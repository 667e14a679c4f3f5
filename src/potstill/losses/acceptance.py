"""Speculative decoding's acceptance, from the two models' next-token distributions.

In speculative sampling (Leviathan et al. 2023; Chen et al. 2023) the target accepts a drafted
token with probability min(1, p(x)/q(x)); over the draft's own proposals that is
Σ_x min(p(x), q(x)) = 1 − TVD(p, q) at that position. Under greedy decoding a drafted token is
accepted when both models' argmax agree. With γ drafted tokens and per-position acceptance
α_t, α_{t+1}, …, one verification pass of the target yields

    1 + Σ_{k=1..γ} Π_{i<k} α_{t+i}

tokens in expectation (the accepted prefix plus the target's own next token). Pure functions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def acceptance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row acceptance probability of sampling from draft ``q`` against target ``p``:
    1 − TVD(p, q) = Σ min(p, q). (N, V) log-probabilities each -> (N,) fp32."""
    return torch.minimum(log_p.float(), log_q.float()).exp().sum(-1)


def greedy_acceptance(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-row greedy acceptance: 1 where the two argmaxes agree. (N, V) each -> (N,) fp32."""
    return (logits_p.argmax(-1) == logits_q.argmax(-1)).float()


def expected_tokens_per_pass(alpha: Tensor, mask: Tensor, gamma: int) -> tuple[Tensor, Tensor]:
    """Expected tokens one target pass yields, drafting ``gamma`` tokens from each start t whose
    γ positions t … t+γ−1 are all in ``mask``, summed over those starts, and their count.

    alpha (B, T) per-position acceptance (anything where mask is False), mask (B, T) bool ->
    (sum, count) fp32 scalars."""
    if gamma < 1:
        raise ValueError(f"gamma (drafted tokens per pass) must be >= 1, got {gamma}")
    alpha = alpha.float() * mask
    run = torch.ones_like(alpha)  # Π of the acceptances so far, per start
    total = torch.ones_like(alpha)  # the target's own token
    valid = mask.clone()
    for k in range(gamma):
        shifted_alpha = torch.zeros_like(alpha)
        shifted_mask = torch.zeros_like(mask)
        shifted_alpha[:, : alpha.shape[1] - k] = alpha[:, k:]  # α_{t+k}
        shifted_mask[:, : mask.shape[1] - k] = mask[:, k:]
        run = run * shifted_alpha
        total = total + run
        valid &= shifted_mask
    return total[valid].sum(), valid.sum().float()
