"""Distillation from a sparse teacher: its top-k log-probabilities per position, no teacher model.

A teacher cache (or a server) keeps, per supervised position, the ids and log-probabilities of the
teacher's k most likely next tokens. The rest of the distribution is one "other" event of mass
1 − Σ top-k. Every divergence is then computed *exactly* on that coarsening: the student's full
distribution (log-softmax over its whole vocabulary, a chunk of rows at a time, never an ``[N, V]``
tensor kept) is gathered at the teacher's k ids, and its remaining mass is the student's "other"
event. Both sides are distributions over the same k + 1 events, so each divergence of
:mod:`potstill.losses.divergences` applies unchanged, with its T² (the same coarsening as the
cross-tokenizer boundary KL; DistillKit and Axolotl train on top-k teacher log-probabilities too).

Temperature: the cached log-probabilities are the teacher's at the temperature they were captured
at. Softening them to another temperature needs the tail's shape, which the cache does not keep,
so the training temperature must equal the capture temperature (callers check it; see
:mod:`potstill.teachers.cache`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from potstill.losses.divergences import check_divergence_args, pointwise_divergence
from potstill.losses.fused import check_sparse_teacher, fused_distill_sums
from potstill.losses.objective import HARD, SOFT, LossSums, weighted_sums
from potstill.losses.rows import (
    chunked_rows,
    head_logits_fp32,
    label_logprob,
    present_events,
    split_tail,
    tail_term,
    with_other,
)


def sparse_distill_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    teacher_tail_entropy: Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    softcap: float | None = None,
    compile: bool = False,
) -> LossSums:
    """``soft_weight · divergence + hard_weight · CE`` against a top-k teacher, summed over rows.

    Args:
        student_hidden: (N, H) final hidden states of the student (gradients flow).
        student_weight: (V, H) the student's LM head (gradients flow); ``student_bias`` (V,).
        labels: (N,) next-token ids; rows equal to ``ignore_index`` carry no loss.
        teacher_ids: (N, k) the teacher's top-k token ids per row (distinct within a row).
        teacher_logprobs: (N, k) their log-probabilities at ``temperature`` (any float dtype;
            the "other" event's mass 1 − Σ exp(·) is derived in fp32). A row with fewer entries
            (a ragged cache) is padded with log-probability −inf and an id repeating one of the
            row's own: such an event is absent on both sides (:func:`~potstill.losses.rows.
            present_events`).
        teacher_tail: (N, m) tokens sampled from the teacher's distribution outside the row's
            k ids, with ``teacher_tail_entropy`` (N,) that tail's entropy (forward KL only): the
            soft term then adds the tail's part of KL(p ‖ q), estimated without bias
            (:func:`potstill.losses.rows.tail_term`), and its expectation is the dense KL.
        kind, temperature, beta, alpha: as :func:`potstill.losses.divergence` (T² included).
        softcap: the student's final-logit soft-capping, if its config has one (then the loss
            runs as autograd through checkpointed chunks, else in the fused engine).
        compile: fused engine: ``torch.compile`` the per-chunk work.

    Returns:
        :class:`potstill.losses.LossSums` with the unweighted ``soft`` / ``hard`` sums of the
        terms whose weight is non-zero.
    """
    if softcap is None:  # the fused engine (which checks the arguments): gradients in forward
        return fused_distill_sums(
            student_hidden, student_weight, labels, teacher_ids=teacher_ids,
            teacher_logprobs=teacher_logprobs, teacher_tail=teacher_tail,
            teacher_tail_entropy=teacher_tail_entropy, kind=kind, temperature=temperature, beta=beta,
            alpha=alpha, soft_weight=soft_weight, hard_weight=hard_weight,
            ignore_index=ignore_index, chunk_size=chunk_size, student_bias=student_bias,
            compile=compile,
        )  # fmt: skip
    # Final-logit soft-capping: autograd through checkpointed chunks (each recomputed in backward)
    check_divergence_args(kind, temperature=temperature, beta=beta, alpha=alpha)
    check_sparse_teacher(
        teacher_ids, teacher_logprobs, teacher_tail, teacher_tail_entropy,
        kind=kind, rows=labels.shape[0],
    )  # fmt: skip
    keep = labels != ignore_index  # (N,)
    hidden, y = student_hidden[keep], labels[keep]  # (n, H), (n,)
    ids = teacher_ids[keep].long()  # (n, k)
    teacher = with_other(teacher_logprobs[keep].float())  # (n, k+1)
    sampled = (
        () if teacher_tail is None else (teacher_tail[keep].long(), teacher_tail_entropy[keep])
    )

    def rows(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, ids: Tensor, log_p: Tensor, *tail):
        logits = head_logits_fp32(h, w, b, softcap)  # (c, V), one chunk
        soft = hard = logits.new_zeros(h.shape[0])
        if soft_weight:
            log_q = torch.log_softmax(logits / temperature, dim=-1)  # (c, V)
            events, _, log_other = split_tail(log_q, ids)  # (c, k), (c, 1)
            coarse = torch.cat([events, log_other], dim=-1)  # (c, k+1)
            coarse, log_p, present = present_events(coarse, log_p)  # (c, k+1) each
            terms = pointwise_divergence(coarse, log_p, kind, temperature, beta, alpha)
            soft = torch.where(present, terms, 0.0).sum(-1)
            if tail:  # (c, m) samples, (c,) entropy
                p_other = log_p[:, -1:].exp()
                sampled = log_q.gather(1, tail[0])  # (c, m)
                soft = soft + tail_term(sampled, log_other, p_other, tail[1], temperature)
        if hard_weight:
            hard = -label_logprob(logits, y)  # (c,) at T = 1
        return soft, hard

    soft, hard = chunked_rows(
        rows,
        hidden,
        student_weight,
        student_bias,
        (y, ids, teacher, *sampled),
        chunk_size=chunk_size,
    )
    terms, weights = {}, {}
    if soft_weight:
        terms[SOFT], weights[SOFT] = soft.sum(), soft_weight
    if hard_weight:
        terms[HARD], weights[HARD] = hard.sum(), hard_weight
    return weighted_sums(terms, weights, student_hidden)
