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

:func:`potstill.losses.rows.chunked_rows` projects hidden states through an LM head a chunk of
rows at a time, so the teacher's ``[N, 262144]`` (or the student's) probabilities exist one chunk
at a time only; the student's chunks are recomputed in backward (activation checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.rows import chunked_rows, head_logits_fp32, label_logprob, with_other

__all__ = [
    "chunked_rows",
    "coarse_teacher",
    "head_logits_fp32",
    "label_logprob",
    "shared_vocab_kl",
    "sorted_top_k",
    "span_divergence",
    "uld_distance",
]


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


def coarse_teacher(logits: Tensor, shared_ids: Tensor, k: int, temperature: float = 1.0):
    """The teacher's top-``k`` shared entries: (positions in the shared list (c, k), log-probs of
    those k events plus "other" (c, k+1)). ``shared_ids``: (M,) teacher ids spelled by both."""
    logp = torch.log_softmax(logits / temperature, dim=-1)[:, shared_ids]  # (c, M)
    top, where = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (c, k)
    return where, with_other(top)


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
    s = with_other(events)  # (c, K+1)
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
