"""Row-wise helpers of the chunked losses that take an LM head and hidden states: logits a chunk
of rows at a time, the log-probability of each row's label, and a coarsened distribution's
"other" event. Pure functions of tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    return chunk_size or max(16, CHUNK_BYTES // (4 * vocab))


def head_logits_fp32(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """(c, H) @ (V, H)ᵀ -> (c, V) fp32 logits (matmul in the input dtype, softmax work in fp32)."""
    logits = (hidden @ weight.T).float()
    if bias is not None:
        logits = logits + bias.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def chunked_rows(
    fn: Callable[..., tuple[Tensor, ...]],
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row_args: tuple[Tensor, ...],
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    """Concatenate ``fn(hidden[i:j], weight, bias, *(a[i:j] for a in row_args))`` over row chunks.

    ``fn`` returns per-row tensors. When gradients are on, each chunk is checkpointed: its
    ``[c, V]`` logits are rebuilt in backward rather than kept, so at most one chunk lives.
    """
    rows = chunk_rows(weight.shape[0], chunk_size)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    outs: list[tuple[Tensor, ...]] = []
    for i in range(0, max(hidden.shape[0], 1), rows):  # an empty input still runs fn once
        args = (hidden[i : i + rows], weight, bias, *(a[i : i + rows] for a in row_args))
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


# ----------------------------------------------------------------------------- per-row terms


def label_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) per row; rows whose label is negative get 0. (c, V), (c,) -> (c,)"""
    lp = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0] - torch.logsumexp(logits, -1)
    return torch.where(labels >= 0, lp, torch.zeros_like(lp))


def with_other(logp: Tensor) -> Tensor:
    """Append log(1 − Σ exp(logp)) as one more event: (c, K) -> (c, K+1)."""
    mass = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-1e-7)  # < 0: "other" has mass
    other = torch.log(-torch.expm1(mass))
    return torch.cat([logp, other], dim=-1)


LOG_TINY = float(torch.log(torch.tensor(torch.finfo(torch.float32).tiny)))  # ≈ −87.3


def split_tail(log_q: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A distribution coarsened to the events ``ids`` plus "other".

    log_q (c, V) log-probabilities, ids (c, k) distinct per row ->
    ``(log-probs of the k events (c, k), the tail's entries (c, V) with the k events at −inf,
    log of the tail's mass (c, 1))``. The tail's mass is summed over its own entries (no
    cancellation in 1 − Σ top-k) and floored at fp32's smallest normal number."""
    events = log_q.gather(1, ids)  # (c, k)
    tail = log_q.scatter(1, ids, float("-inf"))  # (c, V)
    log_other = torch.logsumexp(tail, -1, keepdim=True).clamp(min=LOG_TINY)  # (c, 1)
    return events, tail, log_other


def present_events(coarse_q: Tensor, coarse_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coarse distributions whose teacher side may mark events absent, ready for a divergence.

    A ragged top-k row (a cache written with a mass-coverage rule keeps fewer entries where the
    teacher is sure) is padded to k with events of teacher log-probability −inf: they carry no
    mass on either side (the student's is left in its "other" event). Both sides of such an event
    are set to 0 here, where every divergence's term is finite; callers zero its term and score
    with the returned mask. coarse_q, coarse_p (c, k+1) -> (coarse_q, coarse_p, present (c, k+1))
    """
    present = coarse_p > float("-inf")  # "other" is never −inf (with_other floors it)
    zero = coarse_p.new_zeros(())
    return torch.where(present, coarse_q, zero), torch.where(present, coarse_p, zero), present


def tail_term(
    sampled: Tensor, log_other: Tensor, p_other: Tensor, entropy: Tensor, temperature: float
) -> Tensor:
    """The teacher's tail, from samples: T² · P_o · KL(p̃ ‖ q̃) estimated per row.

    A top-k coarsening says nothing about the shape of the teacher's tail p̃ (its distribution
    over the tokens outside the k events, renormalised), so a student trained on it never learns
    that shape. Forward KL splits exactly (the chain rule of KL): KL(p ‖ q) = KL on the k + 1
    events + P_o · KL(p̃ ‖ q̃), and the second part is −H(p̃) − E_{s∼p̃} log q̃(s), estimated without
    bias from m tokens s drawn from p̃ at capture (top-k plus sampled tokens: Anshumann et al.
    2025, "Sparse Logit Sampling", show sampling keeps KD unbiased where top-k alone does not).

    sampled (c, m) the student's log q at the samples (not among the k events), log_other (c, 1)
    log Q_o, p_other (c, 1) the teacher's P_o, entropy (c,) H(p̃) -> (c,)"""
    cross = -(sampled - log_other).mean(-1)  # (c,) −mean log q̃(s)
    return temperature**2 * p_other[:, 0] * (cross - entropy.float())
