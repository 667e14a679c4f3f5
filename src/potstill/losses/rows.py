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
