"""The fused, chunked distillation loss: every divergence from hidden states and LM heads,
a block of rows at a time, so no ``[N, V]`` logits tensor ever exists — student's or teacher's.

Three layers (after Liger-Kernel's chunked losses):
  1. the per-token maths — each divergence's pointwise terms and their derivative w.r.t. the
     student's log-probabilities, in :data:`potstill.losses.divergences.DIVERGENCES`, shared with
     the naive reference path (which differentiates the terms by autograd instead);
  2. this engine: projection of a chunk of rows through each LM head, the chunk's loss *and its
     gradient* computed right away (one chain rule through log-softmax for every kind), the
     gradient pushed through the student head (two matmuls); it returns sums over the valid rows
     (:func:`fused_distill_sums`), which :func:`potstill.losses.objective.normalise` divides;
  3. thin callers (the ``token_level`` method) that gather hidden states and pass the heads.

Work per chunk of ``n`` valid rows: four ``[n, V, H]`` matmuls (student and teacher projections,
``dL/dh = g @ W`` and ``dL/dW += gᵀ @ h``) and the elementwise softmax work on ``[n, V]``.
Positions whose label is ``ignore_index`` are skipped before any projection. Peak extra memory is
one chunk's logits and temporaries plus the ``(V, H)`` fp32 weight-gradient accumulator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.losses.divergences import DIVERGENCES, check_divergence_args, pointwise_divergence
from potstill.losses.objective import (
    HARD,
    SOFT,
    LossSums,
    mix,
    normalise,
    step_normalizer,
    valid_mask,
)
from potstill.losses.rows import present_events, split_tail, tail_term, with_other

DEFAULT_CHUNK_BUDGET_BYTES = 128 * 2**20  # per-chunk [n, V] work space; see auto_chunk_size
# Fewer rows per chunk cost more time than the memory they save; see auto_chunk_size.
MIN_CHUNK_ROWS = 256
_BUFFERS = 2  # [n, V] buffers per chunk: student logits (then their gradient) and teacher logits
_SUB_ROWS = 16  # rows per softmax block: 16 rows of s, t (bf16) and the score (fp32) sit in L2+L3


def auto_chunk_size(
    vocab_size: int, itemsize: int = 4, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES
) -> int:
    """Rows per chunk so that a chunk's two ``[n, V]`` buffers of ``itemsize``-byte elements (the
    logits of both sides) fit ``budget_bytes``, but never fewer than MIN_CHUNK_ROWS.

    A multiple of 32 in [MIN_CHUNK_ROWS, 4096]. The minimum wins over the budget at large
    vocabularies (fp32 over ~65k entries; 151,936 takes 311 MB): each chunk streams both heads
    and the ``(V, H)`` weight-gradient accumulator through memory whatever its row count, and the
    projections run below matmul speed at few rows (bf16 lose ~40% below ~512 rows on a 2-core CPU).
    Measured on a 2-core CPU, fp32, N=4096, V=151,936, JSD, compiled: 96-row chunks 33.3 s, 256
    rows 25.4 s, 384 rows 26.7 s, 512 rows 25.3 s (best of two alternating runs each).
    """
    rows = budget_bytes // (vocab_size * itemsize * _BUFFERS)
    return int(min(4096, max(MIN_CHUNK_ROWS, rows // 32 * 32)))


@dataclass(frozen=True)
class _Objective:
    """The hyper-parameters of one call; hashable, so compiled chunk functions can be cached."""

    kind: str
    temperature: float
    beta: float
    alpha: float
    soft_weight: float
    hard_weight: float
    sparse: bool = False  # the teacher as top-k (ids, log-probs), not as logits

    def chunk(self, student_logits: Tensor, *teacher_and_labels: Tensor) -> Tensor:
        """A block of rows' unweighted [soft, hard] sums; the student logits are overwritten in
        place by the gradient of the weighted loss. Every row is valid (masked rows never reach
        here).

        student_logits: (n, V) any float dtype; then the teacher — its logits (n, V), or with
        ``sparse`` its top-k ids (n, k) and log-probabilities (n, k), and optionally samples of
        its tail (n, m) with the tail's entropy (n,) — and labels (n,)
        -> (2,) fp32 [soft, hard]; student_logits now holds dL/dlogits

        The divergence's value and pointwise score come from
        :data:`potstill.losses.divergences.DIVERGENCES`; the chain rule through log-softmax is the
        same for every kind: for log_q = log_softmax(z / T) and pointwise G = ∂L/∂log_q,
        ∂L/∂z = (G − q·ΣG) / T. Fewer passes over [n, V] than autograd's, whose JSD backward
        recomputes the mixture's derivative terms that cancel analytically.
        """
        *teacher, labels = teacher_and_labels
        temperature = self.temperature
        z = student_logits.float()  # (n, V)
        log_q = _log_softmax(z, temperature)  # (n, V)
        zero = z.new_zeros(())
        soft, hard, grad = zero, zero, None
        if self.soft_weight and self.sparse:
            soft, grad = self._sparse_soft(log_q, *teacher)
        elif self.soft_weight:
            log_p = _log_softmax(teacher[0].float(), temperature)  # (n, V)
            hp = dict(beta=self.beta, alpha=self.alpha)
            soft = pointwise_divergence(log_q, log_p, self.kind, temperature, **hp).sum()
            # T²/T: the T² of the value, one 1/T of the chain rule.
            score = DIVERGENCES[self.kind].score(log_q, log_p, **hp) * (
                self.soft_weight * temperature
            )  # (n, V)
            grad = score - log_q.exp() * score.sum(-1, keepdim=True)
        if self.hard_weight:
            log_q1 = log_q if temperature == 1.0 else _log_softmax(z, 1.0)  # CE at T=1
            hard = -log_q1.gather(1, labels[:, None]).sum()
            one_hot = torch.arange(z.shape[1], device=z.device) == labels[:, None]  # (n, V)
            hard_grad = self.hard_weight * (log_q1.exp() - one_hot.float())
            grad = hard_grad if grad is None else grad + hard_grad
        if grad is None:
            grad = torch.zeros_like(z)
        student_logits.copy_(grad)  # compiled, the gradient is stored straight into the buffer
        return torch.stack([soft, hard])

    def _sparse_soft(
        self,
        log_q: Tensor,
        ids: Tensor,
        teacher_logp: Tensor,
        tail: Tensor | None = None,
        tail_entropy: Tensor | None = None,
    ):
        """The divergence on the teacher's k events plus "other", and its gradient w.r.t. the
        student's logits. log_q (n, V), ids (n, k), teacher_logp (n, k) -> ((), (n, V))

        With G = ∂L/∂(coarse log_q) per event (the divergence's score, × soft_weight · T as in
        the dense case) and q̃ the student's tail renormalised (q_j / Q_other off the k events, 0
        on them): ∂L/∂z_j = (G_{event of j} + G_other · q̃_j − q_j · ΣG) / T.

        With tail samples (forward KL): + T²·P_o·(−H(p̃) − mean_s log q̃(s)), the sampled estimate
        of P_o·KL(p̃ ‖ q̃) (:func:`potstill.losses.rows.tail_term`), whose gradient adds
        soft_weight · T · P_o · (q̃_j − count_j / m)."""
        ids = ids.long()
        events, tail_logq, log_other = split_tail(log_q, ids)  # (n, k), (n, V), (n, 1)
        coarse_q = torch.cat([events, log_other], dim=-1)  # (n, k+1)
        coarse_p = with_other(teacher_logp.float())  # (n, k+1)
        coarse_q, coarse_p, present = present_events(coarse_q, coarse_p)  # ragged rows' padding
        hp = dict(beta=self.beta, alpha=self.alpha)
        terms = pointwise_divergence(coarse_q, coarse_p, self.kind, self.temperature, **hp)
        soft = torch.where(present, terms, 0.0).sum()
        score = DIVERGENCES[self.kind].score(coarse_q, coarse_p, **hp) * (
            self.soft_weight * self.temperature
        )  # (n, k+1)
        score = torch.where(present, score, 0.0)  # an absent event's padded id gets nothing
        on_tail = score[:, -1:]  # (n, 1) what the student's renormalised tail q̃ is scaled by
        if tail is not None:
            tail = tail.long()
            p_other = coarse_p[:, -1:].exp()  # (n, 1)
            sampled = log_q.gather(1, tail)  # (n, m)
            soft = (
                soft + tail_term(sampled, log_other, p_other, tail_entropy, self.temperature).sum()
            )
            weight = self.soft_weight * self.temperature * p_other  # (n, 1)
            on_tail = on_tail + weight
        q_tilde = (tail_logq - log_other).exp()  # (n, V) 0 on the k events
        grad = on_tail * q_tilde - log_q.exp() * score.sum(-1, keepdim=True)
        grad = grad.scatter_add(1, ids, score[:, :-1])
        if tail is not None:  # − weight / m at each sample (repeats add up)
            grad = grad.scatter_add(1, tail, (-weight / tail.shape[1]).expand_as(tail))
        return soft, grad


def check_sparse_teacher(
    ids: Tensor | None,
    logprobs: Tensor | None,
    tail: Tensor | None,
    entropy: Tensor | None,
    *,
    kind: str,
    rows: int,
) -> None:
    """The top-k teacher's arguments (``ids`` None: a dense teacher, which takes no tail)."""
    if ids is not None and (ids.shape != logprobs.shape or ids.shape[0] != rows):
        raise ValueError(
            f"teacher_ids {tuple(ids.shape)} and teacher_logprobs {tuple(logprobs.shape)} "
            f"must both be (N, k) with N = {rows}"
        )
    if (tail is not None) != (entropy is not None) or (
        tail is not None and (ids is None or kind != "forward_kl")
    ):
        raise ValueError(
            "teacher_tail and teacher_tail_entropy come together, with teacher_ids and "
            "teacher_logprobs, and estimate forward KL only (kind='forward_kl')"
        )


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    """log_softmax(x / T) over the last dim, written out so that a compiled chunk keeps it an
    expression: ``torch.log_softmax``'s decomposition stores the result and adds an inf check.
    (n, V) fp32 -> (n, V) fp32"""
    if temperature != 1.0:
        x = x * (1.0 / temperature)
    shifted = x - x.amax(-1, keepdim=True)
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


@functools.cache
def _chunk_fn(objective: _Objective, compiled: bool):
    """(student_logits, teacher_logits, labels) -> [soft, hard] sums; the student logits are
    replaced by dL/dlogits."""
    if not compiled:
        return objective.chunk
    fn = torch.compile(objective.chunk, dynamic=True, fullgraph=True)

    def call(*args):
        # Trace with the hyper-parameters as constants: by default dynamo lifts Python floats to
        # graph inputs, which turns ``z / T`` into a real division and keeps dead branches.
        with torch._dynamo.config.patch(specialize_float=True):
            return fn(*args)

    return call


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on, else the tensor's own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _FusedDistillation(torch.autograd.Function):
    """Forward computes the summed loss and all student gradients (none when no input needs
    one: a forward-only evaluation); backward only scales them by the upstream gradient."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,  # (N, H_s)
        student_weight: Tensor,  # (V, H_s)
        student_bias: Tensor | None,  # (V,)
        teacher_hidden: Tensor | None,  # (N, H_t)
        teacher_weight: Tensor | None,  # (V, H_t)
        teacher_bias: Tensor | None,  # (V,)
        teacher_logits: Tensor | None,  # (N, V)
        teacher_ids: Tensor | None,  # (N, k) top-k ids ...
        teacher_logprobs: Tensor | None,  # (N, k) ... and their log-probabilities
        teacher_tail: Tensor | None,  # (N, m) tokens sampled from the rest ...
        teacher_tail_entropy: Tensor | None,  # (N,) ... and the rest's entropy
        labels: Tensor,  # (N,)
        objective: _Objective,
        ignore_index: int,
        chunk_size: int,
        compiled: bool,
        want_grad: bool,  # False: the value only (no gradient matmuls, no accumulators)
    ) -> Tensor:
        device = student_hidden.device
        dtype = _compute_dtype(student_hidden)
        vocab = student_weight.shape[0]
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (N_valid,) host sync: chunk count
        # Equal chunks (a small remainder chunk runs its matmuls well below their peak speed).
        n_chunks = max(1, -(-rows.numel() // chunk_size))
        chunk_size = max(1, -(-rows.numel() // n_chunks))
        # Heads once per call in the matmul dtype; the transposed views project as fast as
        # contiguous (H, V) copies (measured, bf16 and fp32 on the 2-core reference machine).
        w_s = student_weight.to(dtype)  # (V, H_s)
        w_s_t = w_s.T  # (H_s, V)
        project = teacher_hidden is not None  # the teacher's logits from its hidden states
        if project:
            t_dtype = _compute_dtype(teacher_hidden)
            w_t_t = teacher_weight.to(t_dtype).T  # (H_t, V)
        # Work space reused by every chunk (fresh [n, V] allocations would page-fault every time):
        # the student's logits, overwritten block by block with their gradient, and the teacher's.
        s_buf = torch.empty(chunk_size, vocab, dtype=dtype, device=device)
        t_buf = torch.empty(chunk_size, vocab, dtype=t_dtype, device=device) if project else None
        # Accumulate straight into the gradients' own dtype when the matmuls run in it; under
        # autocast (fp32 weights, bf16 matmuls) each chunk's product is added into fp32.
        # Only the gradients some input needs: a frozen head (LoRA students) skips its (V, H_s)
        # product, a third of the backward work.
        need_h, need_w, need_b = (want_grad and n for n in ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(student_hidden) if need_h else None  # (N, H_s)
        grad_weight = torch.zeros_like(student_weight) if need_w else None  # (V, H_s)
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
        term_sums = torch.zeros(2, dtype=torch.float32, device=device)  # soft, hard
        step = _chunk_fn(objective, compiled)
        sub = _SUB_ROWS
        with torch.autocast(device.type, enabled=False):  # dtypes are explicit below
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start : start + chunk_size]  # (n,)
                n = idx.numel()
                h = student_hidden[idx].to(dtype)  # (n, H_s)
                s_logits = torch.mm(h, w_s_t, out=s_buf[:n])  # (n, V)
                if student_bias is not None:
                    s_logits += student_bias.to(dtype)
                if teacher_ids is not None:
                    teacher = (teacher_ids[idx], teacher_logprobs[idx])  # (n, k), (n, k)
                    if teacher_tail is not None:  # (n, m), (n,)
                        teacher += (teacher_tail[idx], teacher_tail_entropy[idx])
                elif teacher_logits is not None:
                    teacher = (teacher_logits[idx],)  # (n, V)
                else:
                    t_logits = torch.mm(
                        teacher_hidden[idx].to(t_dtype), w_t_t, out=t_buf[:n]
                    )  # (n, V)
                    if teacher_bias is not None:
                        t_logits += teacher_bias.to(t_dtype)
                    teacher = (t_logits,)
                y = labels[idx]
                # The softmax work, a few rows at a time so each block stays in cache; each block's
                # logits are replaced by dL/dlogits once read.
                for i in range(0, n, sub):
                    j = min(i + sub, n)
                    term_sums += step(s_logits[i:j], *(t[i:j] for t in teacher), y[i:j])
                if not want_grad:
                    continue
                g = s_logits  # (n, V) = dL/dlogits
                if need_h:
                    grad_hidden[idx] = torch.mm(g, w_s).to(grad_hidden.dtype)  # (n, H_s) = dL/dh
                if need_w and grad_weight.dtype == dtype:
                    grad_weight.addmm_(g.T, h)  # (V, H_s) += gᵀ h
                elif need_w:
                    grad_weight += torch.mm(g.T, h)
                if need_b:
                    grad_bias += g.sum(0, dtype=torch.float32)
        del s_buf, t_buf
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.dtypes = (
            student_hidden.dtype,
            student_weight.dtype,
            None if student_bias is None else student_bias.dtype,
        )
        weights = {SOFT: objective.soft_weight, HARD: objective.hard_weight}
        total = mix({SOFT: term_sums[0], HARD: term_sums[1]}, weights)
        ctx.mark_non_differentiable(term_sums)
        return total, term_sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_terms: Tensor):
        # The gradients were computed in forward; scale them by the upstream gradient, in place.
        out = []
        for grad, dtype, needed in zip(
            ctx.grads, ctx.dtypes, ctx.needs_input_grad[:3], strict=True
        ):
            out.append(grad.mul_(grad_output).to(dtype) if needed and grad is not None else None)
        ctx.grads = None  # single use: free the buffers
        return (*out, *([None] * 14))


def fused_distill_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
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
    teacher_bias: Tensor | None = None,
    compile: bool = False,
) -> LossSums:
    """The fused loss as sums over the valid rows (what methods return to the training loop,
    which divides once); see :func:`fused_distill_loss` for the arguments. ``terms`` holds the
    unweighted ``soft`` / ``hard`` sums of the terms whose weight is non-zero. Under
    ``torch.no_grad`` (or with no input needing a gradient) only the value is computed."""
    views = {
        "teacher_hidden + teacher_weight": teacher_hidden is not None
        and teacher_weight is not None,
        "teacher_logits": teacher_logits is not None,
        "teacher_ids + teacher_logprobs": teacher_ids is not None and teacher_logprobs is not None,
    }
    if sum(views.values()) != 1:
        raise ValueError(f"pass the teacher in exactly one of these forms: {', '.join(views)}")
    vocab = student_weight.shape[0]
    sparse = teacher_ids is not None
    check_sparse_teacher(
        teacher_ids, teacher_logprobs, teacher_tail, teacher_tail_entropy,
        kind=kind, rows=labels.shape[0],
    )  # fmt: skip
    if not sparse:
        teacher_vocab = (
            teacher_logits.shape[-1] if teacher_logits is not None else teacher_weight.shape[0]
        )
        if teacher_vocab != vocab:
            raise ValueError(
                f"student head has {vocab} rows, teacher {teacher_vocab}; slice both to the shared vocabulary"
            )
    check_divergence_args(kind, temperature=temperature, beta=beta, alpha=alpha)
    objective = _Objective(
        kind,
        float(temperature),
        float(beta),
        float(alpha),
        float(soft_weight),
        float(hard_weight),
        sparse,
    )
    detach = lambda t: None if t is None else t.detach()  # noqa: E731 - the teacher is a constant
    loss, sums = _FusedDistillation.apply(
        student_hidden,
        student_weight,
        student_bias,
        detach(teacher_hidden),
        detach(teacher_weight),
        detach(teacher_bias),
        detach(teacher_logits),
        teacher_ids,
        detach(teacher_logprobs),
        teacher_tail,
        detach(teacher_tail_entropy),
        labels,
        objective,
        ignore_index,
        chunk_size or auto_chunk_size(vocab, _compute_dtype(student_hidden).itemsize),
        compile,
        torch.is_grad_enabled()
        and any(
            t is not None and t.requires_grad
            for t in (student_hidden, student_weight, student_bias)
        ),
    )
    terms = {
        name: sums[i]
        for i, (name, weight) in enumerate(((SOFT, soft_weight), (HARD, hard_weight)))
        if weight
    }
    return LossSums(loss, terms)


def fused_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    teacher_tail: Tensor | None = None,
    teacher_tail_entropy: Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    normalizer: Tensor | float | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    compile: bool = False,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``soft_weight · divergence + hard_weight · CE`` from hidden states, never holding ``[N, V]``.

    Args:
        student_hidden: (N, H_s) final hidden states of the student (gradients flow).
        student_weight: (V, H_s) student LM head (gradients flow); ``student_bias`` (V,) optional.
        labels: (N,) next-token ids, already shifted; ``ignore_index`` rows are skipped.
        teacher_hidden, teacher_weight: (N, H_t), (V, H_t) — the teacher as hidden states and head
            (projected a chunk at a time; H_t may differ from H_s) ...
        teacher_logits: (N, V) ... or as precomputed logits, read a chunk at a time ...
        teacher_ids, teacher_logprobs: (N, k), (N, k) ... or as its top-k token ids and their
            log-probabilities at ``temperature`` (a teacher cache): the divergence is then exact
            on the k events plus one "other" event (:mod:`potstill.losses.sparse`).
        teacher_tail, teacher_tail_entropy: (N, m), (N,) with the top-k, forward KL only: tokens
            sampled from the teacher's distribution outside the k ids, and that tail's entropy;
            they add the tail's part of the KL, estimated without bias
            (:func:`potstill.losses.rows.tail_term`).
        kind, temperature, beta, alpha: as :func:`potstill.losses.divergence` (T² included).
        soft_weight, hard_weight: weights of the divergence and of cross-entropy on ``labels``.
        normalizer: the divisor of the summed loss: valid tokens of the whole optimizer step when
            a step spans several calls (default: this call's valid count, at least 1).
        chunk_size: rows per chunk; default :func:`auto_chunk_size` of the vocabulary.
        compile: ``torch.compile`` the per-chunk loss and gradient (fuses the softmax work).
        return_terms: also return the unweighted, equally normalised ``soft`` / ``hard`` terms.

    Returns:
        scalar fp32 loss whose backward reaches ``student_hidden``, ``student_weight`` and
        ``student_bias`` (and, with ``return_terms``, a dict of detached terms as
        :func:`potstill.losses.distillation_loss` gives). The teacher never receives gradients.
    """
    sums = fused_distill_sums(
        student_hidden,
        student_weight,
        labels,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_logits=teacher_logits,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        teacher_tail=teacher_tail,
        teacher_tail_entropy=teacher_tail_entropy,
        kind=kind,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        compile=compile,
    )
    if normalizer is None:
        normalizer = step_normalizer(valid_mask(labels, ignore_index).sum())
    loss, terms = normalise(sums, normalizer)
    return (loss, terms) if return_terms else loss


__all__ = ["auto_chunk_size", "fused_distill_loss", "fused_distill_sums"]
