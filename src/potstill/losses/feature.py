"""Feature distillation terms: the student mimics the teacher's intermediate hidden states and
attention, not only its output distribution. Pure functions of tensors; per-token values, which
:mod:`potstill.losses.objective` sums and normalises like every other term.

* ``hidden``: a student layer's hidden states against a teacher layer's, after a learned linear
  projector where the widths differ (DistilBERT's cosine loss, Sanh et al. 2019; FitNets' hints,
  Romero et al. 2015) — MSE or cosine distance per token, both sides optionally layer-normalised.
* ``attention``:
  - MiniLM-v2 self-attention *relations* (Wang et al. 2021): for Q, K and V of a layer, each split
    into R relation heads, the scaled dot-product relation of every token to the tokens it may
    attend to, softmax-normalised; the student matches the teacher's per row by KL. R is chosen, so
    teacher and student head counts (and widths) may differ.
  - TinyBERT's attention distributions (Jiao et al. 2020): KL between the teacher's and the
    student's attention probabilities, head by head; head counts must match.

Relations and attention are causal (a token relates to itself and the tokens before it, as a
decoder attends; relations take ``causal=False`` for a bidirectional encoder) and live within one
document: the caller passes one document's vectors at a
time, so a packed or padding-free batch never relates two documents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

HIDDEN_LOSSES = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i ↔ teacher layer round((i + 1) · L_t / L_s) − 1 (0-based layer indices):
    the last layers meet, the others spread evenly (e.g. 6 of 30: 4, 9, 14, 19, 24, 29)."""
    return [
        (i, max(0, round((i + 1) * teacher_layers / student_layers) - 1))
        for i in range(student_layers)
    ]


def hidden_distance(student: Tensor, teacher: Tensor, *, loss: str, normalize: bool) -> Tensor:
    """Per-token distance of (projected) student hidden states to the teacher's.

    student (N, H), teacher (N, H) -> (N,) fp32: ``mse`` is the mean squared difference over H,
    ``cosine`` is 1 − cos. ``normalize`` layer-normalises both sides first (no affine), so the
    term compares directions and relative magnitudes, not the layers' overall scale."""
    s, t = student.float(), teacher.float()
    if normalize:
        s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
    if loss == "mse":
        return (s - t).pow(2).mean(-1)
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise ValueError(f"hidden loss must be one of {HIDDEN_LOSSES}, got {loss!r}")


def _causal_log_softmax(scores: Tensor, causal: bool = True) -> Tensor:
    """Row-wise log-softmax over columns ≤ the row (every column when not ``causal``).
    (..., n, n) -> (..., n, n), −inf above the diagonal when causal"""
    if not causal:
        return torch.log_softmax(scores, dim=-1)
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    return torch.log_softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def _row_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row of causal distributions (−inf above the diagonal in both). -> (..., n)"""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isfinite(log_p), terms, 0.0).sum(-1)


def token_vectors(x: Tensor) -> Tensor:
    """(heads, n, D) -> (n, heads · D): a layer's Q, K or V as one vector per token."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(n, H) -> (heads, n, H / heads)"""
    n, width = x.shape
    if width % heads:
        raise ValueError(f"a width of {width} does not split into {heads} relation heads")
    return x.reshape(n, heads, width // heads).transpose(0, 1)


def _relation_rows(student: Tensor, teacher: Tensor, heads: int, causal: bool) -> Tensor:
    s, t = _split_heads(student.float(), heads), _split_heads(teacher.float(), heads)
    log_s = _causal_log_softmax(s @ s.transpose(1, 2) / math.sqrt(s.shape[-1]), causal)
    log_t = _causal_log_softmax(t @ t.transpose(1, 2) / math.sqrt(t.shape[-1]), causal)
    return _row_kl(log_t, log_s).mean(0)  # (n,) averaged over relation heads; (R, n, n) above


def relation_kl(student: Tensor, teacher: Tensor, *, heads: int, causal: bool = True) -> Tensor:
    """MiniLM-v2 relation loss of one document's vectors (its Q, K or V at one layer).

    student (n, H_s), teacher (n, H_t) with H_s and H_t divisible by ``heads`` -> (n,) fp32: per
    token, KL(teacher ‖ student) between the softmax-normalised scaled dot products of the token
    with itself and the tokens before it (every token of the document when not ``causal``: a
    bidirectional encoder), averaged over the relation heads. The ``[heads, n, n]`` relations
    are rebuilt in backward rather than kept (one relation's at a time)."""
    if torch.is_grad_enabled() and student.requires_grad:
        return checkpoint(_relation_rows, student, teacher, heads, causal, use_reentrant=False)
    return _relation_rows(student, teacher, heads, causal)


def _attention_rows(
    s_query: Tensor, s_key: Tensor, t_query: Tensor, t_key: Tensor, s_scale: float, t_scale: float
) -> Tensor:
    log_s = _causal_log_softmax(s_query.float() @ s_key.float().transpose(1, 2) * s_scale)
    log_t = _causal_log_softmax(t_query.float() @ t_key.float().transpose(1, 2) * t_scale)
    return _row_kl(log_t, log_s).mean(0)  # (n,)


def attention_kl(
    student_query: Tensor,
    student_key: Tensor,
    teacher_query: Tensor,
    teacher_key: Tensor,
    *,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
) -> Tensor:
    """TinyBERT's attention loss for one document: KL(teacher ‖ student) between the two models'
    causal attention probabilities, per query token, averaged over heads.

    queries (heads, n, D), keys (heads or fewer KV heads, n, D) — grouped-query keys are repeated
    to the query heads; teacher and student must have the same number of query heads (their D
    may differ); scales default to 1/√D -> (n,) fp32."""
    heads = student_query.shape[0]
    if teacher_query.shape[0] != heads:
        raise ValueError(
            f"attention KL compares head by head: the student has {heads} query heads, the "
            f"teacher {teacher_query.shape[0]}; use relations (attention.kind=relations) instead"
        )
    s_key = student_key.repeat_interleave(heads // student_key.shape[0], dim=0)
    t_key = teacher_key.repeat_interleave(heads // teacher_key.shape[0], dim=0)
    s_scale = student_scale or student_query.shape[-1] ** -0.5
    t_scale = teacher_scale or teacher_query.shape[-1] ** -0.5
    args = (student_query, s_key, teacher_query, t_key, s_scale, t_scale)
    if torch.is_grad_enabled() and student_query.requires_grad:
        return checkpoint(_attention_rows, *args, use_reentrant=False)
    return _attention_rows(*args)


# ----------------------------------------------------------------------------- relations in a batch


def _off_diagonal(n: int, device) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def similarity_kl(student: Tensor, teacher: Tensor, *, temperature: float = 0.05) -> Tensor:
    """KL(teacher ‖ student) between each example's softmax-normalised cosine similarities to the
    batch's other examples (its own left out): the similarity structure an embedding model is used
    for. student (B, D_s), teacher (B, D_t) -> (B,) fp32 per example."""
    n = student.shape[0]
    keep = _off_diagonal(n, student.device)
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    log_s = torch.log_softmax((s @ s.T / temperature).masked_fill(~keep, float("-inf")), -1)
    log_t = torch.log_softmax((t @ t.T / temperature).masked_fill(~keep, float("-inf")), -1)
    return torch.where(keep, log_t.exp() * (log_t - log_s), 0.0).sum(-1)


def similarity_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of each example's cosine similarities to the batch's others.
    (B, D_s), (B, D_t) -> (B,)"""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    keep = _off_diagonal(student.shape[0], student.device)
    return torch.where(keep, (s @ s.T - t @ t.T) ** 2, 0.0).sum(-1) / max(student.shape[0] - 1, 1)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD's distance term (Park et al. 2019): pairwise Euclidean distances, each side divided by
    its mean off-diagonal distance, compared with a smooth L1 (Huber) loss.
    (B, D_s), (B, D_t) -> (B,) per example (mean over its pairs)."""
    keep = _off_diagonal(student.shape[0], student.device)

    def normalised(x: Tensor) -> Tensor:
        d = torch.cdist(x.float(), x.float())  # (B, B)
        return d / d[keep].mean().clamp_min(1e-12)

    s, t = normalised(student), normalised(teacher)
    pairs = F.smooth_l1_loss(s, t, reduction="none")  # (B, B)
    return torch.where(keep, pairs, 0.0).sum(-1) / max(student.shape[0] - 1, 1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD's angle term: for every anchor j, the cosine of the angle between the directions from j
    to i and from j to k, compared with a smooth L1 loss. (B, D_s), (B, D_t) -> (B,) per anchor
    (mean over its i, k pairs; [B, B, B] in memory)."""

    def angles(x: Tensor) -> Tensor:
        e = F.normalize(x.float()[None, :, :] - x.float()[:, None, :], dim=-1)  # (B, B, D) j->i
        return e @ e.transpose(1, 2)  # (B, B, B): anchor j, then i, k

    n = student.shape[0]
    per = F.smooth_l1_loss(angles(student), angles(teacher), reduction="none")  # (B, B, B)
    return per.sum((1, 2)) / max((n - 1) ** 2, 1)


BATCH_RELATIONS = {
    "kl": similarity_kl,
    "mse": similarity_mse,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
}


def batch_relation(kind: str, student: Tensor, teacher: Tensor, *, temperature: float) -> Tensor:
    """The relation term ``kind`` of :data:`BATCH_RELATIONS` per example (``temperature``: the
    softmax's, used by ``kl`` only). (B, D_s), (B, D_t) -> (B,)"""
    if kind == "kl":
        return similarity_kl(student, teacher, temperature=temperature)
    return BATCH_RELATIONS[kind](student, teacher)
