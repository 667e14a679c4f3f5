"""Cross-tokenizer distillation: teacher and student with different vocabularies.

Sequences: the dataset, read by each model through its own tokenizer (and its own chat template):
:func:`potstill.data.alignment.cross_example` stores the teacher's ids and the alignment next to
the student's example. The student's cross-entropy on the data is weighted by ``loss.hard_weight``
(0 by default; the cross-tokenizer recipes set 1).
Teacher signal: the live teacher's distributions on its own tokens, a chunk of rows at a time.
Objective, by ``alignment``:

* ``uld`` — Universal Logit Distillation (Boizard et al. 2024): every student position is paired
  with the teacher position whose context ends nearest; the sorted top-K probabilities of the two
  are compared (L1 = the paper's closed-form Wasserstein, or KL). Approximate twice over: paired
  contexts may end on different characters, and sorting forgets which token carried the mass.
* ``spans`` — exact alignment on shared character boundaries (see ``alignment.py``). Each span is
  the same text for both models, so (1) the probability each assigns to it, by the chain rule over
  its own tokens, is compared with a binary KL (approximate likelihood matching, Minixhofer et al.
  2025), and (2) where a span starts both contexts end on the same character, so the two
  next-token distributions are compared over the vocabulary entries both tokenizers spell the same
  way (the teacher's top-K of them plus one pooled "other" event; an exact coarsening, not a guess
  at which token corresponds to which).

``loss = hard_weight · CE + soft_weight · (ULD | boundary KL) + span_weight · span term``, each
summed over its rows (the loop divides by the step's number of student target tokens). The CE
term is logged as ``hard``, as in every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from potstill.data.alignment import byte_lengths, cross_example, shared_vocab
from potstill.lm import final_hidden, lm_head, logit_softcap
from potstill.losses.cross_tokenizer import (
    chunked_rows,
    coarse_teacher,
    head_logits_fp32,
    label_logprob,
    shared_vocab_kl,
    sorted_top_k,
    span_divergence,
    uld_distance,
)
from potstill.losses.objective import HARD, LossSums, mix
from potstill.methods.base import Method

if TYPE_CHECKING:
    from potstill.recipe import Recipe

ALIGNMENTS = ("uld", "spans")


def teacher_batch(batch: dict[str, Tensor], pad_id: int) -> dict[str, Tensor]:
    """The teacher's own reading of a collated cross-tokenizer batch (padding -1 -> pad id)."""
    ids = batch["teacher_input_ids"]  # (B, T_t), -1 on padding
    return {
        "input_ids": ids.clamp(min=0).masked_fill(ids < 0, pad_id),
        "attention_mask": (ids >= 0).long(),
        "labels": batch["teacher_labels"],  # (B, T_t), -1 where nothing is predicted
    }


def _segment_sum(values: Tensor, segments: Tensor, count: int) -> Tensor:
    """Σ of ``values`` per segment id in [0, count): (N,), (N,) -> (count,)."""
    return values.new_zeros(count).index_add(0, segments, values)


@dataclass
class CrossTokenizer(Method, name="cross_tokenizer"):
    alignment: str = "spans"
    soft_weight: float = 1.0
    hard_weight: float = 1.0
    span_weight: float = 1.0
    temperature: float = 1.0
    top_k: int = 64
    uld_distance: str = "l1"
    chunk_size: int | None = None
    ignore_index: int = -100
    encodes_records = True  # each record is read by both tokenizers and aligned
    _bound: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> CrossTokenizer:
        c = r.cross_tokenizer
        return cls(
            alignment=c.alignment,
            soft_weight=r.loss.soft_weight,
            hard_weight=r.loss.hard_weight,
            span_weight=c.span_weight,
            temperature=r.loss.kd_temperature,
            top_k=c.top_k,
            uld_distance=c.uld_distance,
            chunk_size=r.loss.chunk_size,
        )

    def describe(self) -> str:
        what = (
            f"ULD ({self.uld_distance}, top-{self.top_k})"
            if self.alignment == "uld"
            else f"span likelihoods (weight {self.span_weight}) + boundary KL over shared "
            f"entries (top-{self.top_k})"
        )
        return (
            f"cross_tokenizer: {what}; CE weight {self.hard_weight}, soft weight {self.soft_weight}"
        )

    # ------------------------------------------------------------------------- data

    def bind(self, student_tokenizer, teacher_tokenizer) -> None:
        """Remember both tokenizers (the loss needs the shared vocabulary and the teacher's pad)."""
        s_ids, t_ids = shared_vocab(student_tokenizer, teacher_tokenizer)
        pad = teacher_tokenizer.pad_token_id
        self._bound = {
            "student_tokenizer": student_tokenizer,
            "teacher_tokenizer": teacher_tokenizer,
            "shared_student": torch.tensor(s_ids, dtype=torch.long),
            "shared_teacher": torch.tensor(t_ids, dtype=torch.long),
            "teacher_pad": pad if pad is not None else (teacher_tokenizer.eos_token_id or 0),
            "teacher_bytes": torch.tensor(byte_lengths(teacher_tokenizer), dtype=torch.float64),
        }

    def example(self, record: dict, *, max_length: int):  # (Example, truncated)
        return cross_example(
            record,
            self._bound["student_tokenizer"],
            self._bound["teacher_tokenizer"],
            max_length=max_length,
        )

    # ------------------------------------------------------------------------- loss

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, Tensor],
    ) -> LossSums:
        if not self._bound:
            raise RuntimeError("cross_tokenizer: call bind(student_tokenizer, teacher_tokenizer)")
        device = batch["input_ids"].device
        tb = teacher_batch(batch, self._bound["teacher_pad"])
        labels = batch["labels"]  # (B, T_s)
        mask = labels != self.ignore_index  # (B, T_s)
        B, T_s = labels.shape
        T_t = tb["input_ids"].shape[1]
        s_h = final_hidden(student, batch)[mask]  # (N_s, H_s)
        s_w, s_b = lm_head(student)
        s_cap = logit_softcap(student)
        with torch.no_grad():
            t_h_all = final_hidden(teacher, tb)  # (B, T_t, H_t)
        t_w, t_b = lm_head(teacher)
        t_cap = logit_softcap(teacher)

        # Teacher rows each student row is compared with: (B, T_s) -> (N_s,) flat teacher index.
        rows_b = torch.arange(B, device=device)[:, None].expand(B, T_s)
        if self.alignment == "uld":
            partner = batch["uld_teacher"][:, :T_s]  # (B, T_s) teacher position or -1
        else:  # the first position of each span: both contexts end on the same character
            partner = batch["start_teacher"][:, :T_s]  # (B, T_s) teacher position or -1
        partner = torch.where(mask, partner, -1)
        has = partner >= 0  # (B, T_s)
        terms: dict[str, Tensor] = {}
        t_labels = tb["labels"]  # (B, T_t)
        shared_s = self._bound["shared_student"].to(device)
        shared_t = self._bound["shared_teacher"].to(device)
        # One pass of the teacher's head over the rows anything needs: the partners (ULD), or
        # every span position (spans: span starts are the partners).
        if self.alignment == "uld":
            t_need = torch.zeros_like(t_labels, dtype=torch.bool)  # (B, T_t)
            t_need[rows_b[has], partner[has]] = True
        else:
            t_need = batch["span_teacher"][:, :T_t] >= 0  # (B, T_t)
        compact = torch.cumsum(t_need.flatten(), 0) - 1  # flat teacher row -> compact row
        pair_rows = compact[(rows_b * T_t + partner.clamp(min=0))[has]]  # (P,)
        temperature, top_k = self.temperature, self.top_k

        def teacher_fn(h, w, b, y):
            logits = head_logits_fp32(h, w, b, t_cap)  # (c, V_t): one chunk of 262k columns
            if self.alignment == "uld":
                return (label_logprob(logits, y), sorted_top_k(logits, top_k, temperature))
            return (label_logprob(logits, y), *coarse_teacher(logits, shared_t, top_k, temperature))

        with torch.no_grad():
            t_lp, *t_rows_info = chunked_rows(
                teacher_fn,
                t_h_all[t_need],
                t_w,
                t_b,
                (t_labels[t_need],),
                chunk_size=self.chunk_size,
            )
        t_info = [x[pair_rows] for x in t_rows_info]  # per pair: (P, …)

        # Student rows: label log-prob (CE, spans) and the per-row soft term against its partner.
        pair_of_row = torch.full((B, T_s), -1, dtype=torch.long, device=device)
        pair_of_row[has] = torch.arange(int(has.sum()), device=device)
        row_pair = pair_of_row[mask]  # (N_s,) index into the pair tensors or -1
        expanded = [_expand_rows(x, row_pair) for x in t_info]
        alignment, distance = self.alignment, self.uld_distance

        def student_fn(h, w, b, y, pair, *teacher_parts):
            logits = head_logits_fp32(h, w, b, s_cap)  # (c, V_s)
            lp = label_logprob(logits, y)
            if alignment == "uld":
                soft = uld_distance(
                    sorted_top_k(logits, top_k, temperature), teacher_parts[0], distance
                )
            else:
                where, t_logp = teacher_parts
                soft = shared_vocab_kl(logits, shared_s, where, t_logp, temperature)
            return lp, torch.where(pair >= 0, soft, torch.zeros_like(soft))

        s_lp, soft = chunked_rows(
            student_fn,
            s_h,
            s_w,
            s_b,
            (labels[mask], row_pair, *expanded),
            chunk_size=self.chunk_size,
        )
        soft_name = "uld" if alignment == "uld" else "boundary_kl"
        terms[HARD] = -s_lp.sum()
        terms[soft_name] = soft.sum() * self.temperature**2
        weights = {HARD: self.hard_weight, soft_name: self.soft_weight}
        if alignment == "spans":
            span_s, span_t = batch["span_student"][:, :T_s], batch["span_teacher"][:, :T_t]
            n_spans = int(max(span_s.max(), span_t.max()).item()) + 1 if span_s.numel() else 0
            seg_s = torch.arange(B, device=device)[:, None] * n_spans + span_s  # (B, T_s)
            seg_t = torch.arange(B, device=device)[:, None] * n_spans + span_t  # (B, T_t)
            in_s = (span_s >= 0)[mask]  # (N_s,)
            count = B * max(n_spans, 1)
            s_span = _segment_sum(s_lp[in_s], seg_s[mask][in_s], count)  # (B·S,)
            t_span = _segment_sum(t_lp, seg_t[t_need], count)  # (B·S,)
            present = _segment_sum(torch.ones_like(t_lp), seg_t[t_need], count) > 0
            terms["span_kl"] = span_divergence(s_span[present], t_span[present]).sum()
            weights["span_kl"] = self.span_weight
        return LossSums(mix(terms, weights), {k: v.detach() for k, v in terms.items()})

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, student, teacher, eval_batches, tokenizer) -> dict[str, float]:
        """The teacher's bits per byte on its own reading of the held-out text."""
        nll, nbytes = 0.0, 0.0
        table = self._bound["teacher_bytes"]
        for batch in eval_batches:
            tb = teacher_batch(batch, self._bound["teacher_pad"])
            y = tb["labels"]
            rows = y >= 0
            (lp,) = chunked_rows(
                lambda h, w, b, lab: (label_logprob(head_logits_fp32(h, w, b), lab),),
                final_hidden(teacher, tb)[rows],
                *lm_head(teacher),
                (y[rows],),
                chunk_size=self.chunk_size,
            )
            nll -= float(lp.double().sum())
            nbytes += float(table[y[rows].cpu()].sum())
        return {"teacher_bits_per_byte": nll / max(nbytes, 1.0) / 0.6931471805599453}


def _expand_rows(x: Tensor, row_pair: Tensor) -> Tensor:
    """Per-pair tensor (P, …) -> per-student-row (N_s, …); rows without a pair get pair 0's
    values (masked out by the caller) or zeros when there is no pair at all."""
    if x.shape[0] == 0:
        return x.new_zeros((row_pair.shape[0], *x.shape[1:]))
    return x[row_pair.clamp(min=0)]
