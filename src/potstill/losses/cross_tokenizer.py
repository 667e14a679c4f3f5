"""Losses between models that do not share a vocabulary; pure functions plus one chunked driver.

Per-row objectives (rows are aligned position pairs, see :mod:`potstill.data.alignment`):
* :func:`uld_distance` — ULD (Boizard et al. 2024): sort each side's probabilities and compare
  the two sorted top-K vectors, with the L1 distance (the paper's closed-form Wasserstein-1 between
  the sorted distributions) or KL. Vocabulary-free, and blind to *which* token got the mass.
* :func:`shared_vocab_kl` — at positions where both contexts end on the same character, the
  teacher's distribution over the entries both vocabularies spell the same way (its top-K of them,
  the rest pooled into one "other" event) against the student's over the same K+1 events: an
  exact KL between two coarsenings of the distributions, zero iff they agree on those events.
* :func:`span_divergence` — approximate likelihood matching (Minixhofer et al. 2025, "Universal
  Cross-Tokenizer Distillation via Approximate Likelihood Matching"): each aligned span is the same
  text for both models; the chain rule over each model's own tokens gives the probability it
  assigns that text, and the binary KL between Bernoulli(p_teacher) and Bernoulli(p_student)
  compares them.

:func:`chunked_rows` projects hidden states through an LM head a chunk of rows at a time, so the
teacher's ``[N, 262144]`` (or the student's) probabilities exist one chunk at a time only; the
student's chunks are recomputed in backward (activation checkpointing) instead of being kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def sorted_top_k(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """The ``k`` largest probabilities at ``temperature``, descending: (c, V) -> (c, k)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1).values


def uld_distance(student_sorted: Tensor, teacher_sorted: Tensor, kind: str = "l1") -> Tensor:
    """ULD per row between sorted probability vectors (c, K), (c, K') -> (c,).

    The shorter side is padded with zeros (the paper pads the smaller vocabulary). ``l1`` is
    Σ|p_s(i) − p_t(i)|; ``kl`` is Σ p_t(i) (log p_t(i) − log p_s(i)) over the sorted vectors,
    each renormalised over its K entries.
    """
    k = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    s = F.pad(student_sorted, (0, k - student_sorted.shape[-1]))
    t = F.pad(teacher_sorted, (0, k - teacher_sorted.shape[-1]))
    if kind == "l1":
        return (s - t).abs().sum(-1)
    if kind == "kl":
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.xlogy(t, t).sum(-1) - (t * s.clamp_min(1e-30).log()).sum(-1)
    raise ValueError(f"ULD distance must be l1 or kl, got {kind!r}")


def _with_other(logp: Tensor) -> Tensor:
    """Append log(1 − Σ exp(logp)) as one more event: (c, K) -> (c, K+1)."""
    mass = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-1e-7)  # < 0: "other" has mass
    other = torch.log(-torch.expm1(mass))
    return torch.cat([logp, other], dim=-1)


def coarse_teacher(logits: Tensor, shared_ids: Tensor, k: int, temperature: float = 1.0):
    """The teacher's top-``k`` shared entries: (positions in the shared list (c, k), log-probs of
    those k events plus "other" (c, k+1)). ``shared_ids``: (M,) teacher ids spelled by both."""
    logp = torch.log_softmax(logits / temperature, dim=-1)[:, shared_ids]  # (c, M)
    top, where = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (c, k)
    return where, _with_other(top)


def shared_vocab_kl(
    student_logits: Tensor,
    shared_ids: Tensor,
    teacher_where: Tensor,
    teacher_logp: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher ‖ student) over the teacher's K shared events plus "other", per row.

    ``shared_ids``: (M,) student ids of the shared entries; ``teacher_where`` (c, K) picks the
    teacher's events among them; ``teacher_logp`` (c, K+1) from :func:`coarse_teacher`.
    """
    logp = torch.log_softmax(student_logits / temperature, dim=-1)  # (c, V_s)
    events = logp.gather(1, shared_ids[teacher_where])  # (c, K)
    s = _with_other(events)  # (c, K+1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1)


def span_divergence(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Binary KL(Bernoulli(p_t) ‖ Bernoulli(p_s)) per span from log-likelihoods (S,), (S,) -> (S,).

    p = P(the span's text | the shared prefix), each by the chain rule over its own tokens.
    """
    s = student_logp.clamp(max=-1e-6)
    t = teacher_logp.clamp(max=-1e-6)
    pt = t.exp()
    log1m = lambda x: torch.log(-torch.expm1(x))  # noqa: E731  log(1 - e^x)
    return pt * (t - s) + (1 - pt) * (log1m(t) - log1m(s))
