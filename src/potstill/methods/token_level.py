"""Token-level logit distillation (Hinton et al. 2015; the white-box KD of DistillKit / GKD λ=0).

Sequences: the dataset (gold text or chat, loss on assistant/completion tokens only).
Teacher signal: the live teacher's full next-token distribution at every supervised position,
computed under ``no_grad`` from its final hidden states and LM head.
Objective: ``soft_weight · divergence(student ‖ teacher) + hard_weight · cross-entropy``.
Student and teacher must share a vocabulary (``potstill check`` verifies it).

Teacher signal from a cache instead (``teacher.source: cache``): the teacher's top-k
log-probabilities, written by ``potstill cache``, are read for each batch by example index and no
teacher model is loaded; the objective is the same divergence computed exactly on the top-k +
"other" coarsening (:mod:`potstill.losses.sparse`).

Two paths compute the same loss from a live teacher: ``fused`` (default) projects hidden states through both LM heads a
chunk of rows at a time and never holds ``[tokens, vocab]`` logits; ``naive`` builds the full
logits of the supervised positions — the reference, and a debug switch (``loss.path=naive``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from potstill.lm import final_hidden, head_logits, lm_head, logit_softcap
from potstill.losses import LossSums, distillation_sums, fused_distill_sums
from potstill.losses.rows import chunked_rows, head_logits_fp32
from potstill.losses.sparse import sparse_distill_sums
from potstill.methods.base import Method
from potstill.teachers.cache import CacheReader
from potstill.teachers.server import ServedTeacher, served_teacher

if TYPE_CHECKING:
    from potstill.recipe import Recipe


@dataclass
class TokenLevel(Method, name="token_level"):
    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    vocab_size: int | None = None  # shared real vocabulary; padded head rows are sliced off
    path: str = "fused"  # fused | naive
    compile: bool = False  # fused path: torch.compile the per-chunk softmax work
    chunk_size: int | None = None  # fused path: rows per chunk (None: from a memory budget)
    ignore_index: int = -100
    cache: str | None = None  # teacher.source=cache: the folder
    server: ServedTeacher | None = None  # teacher.source=server: its client
    fallback_said: bool = field(default=False, repr=False)  # the naive-fallback note, once
    readers: dict[str, CacheReader] = field(default_factory=dict, repr=False)  # by split

    @property
    def sparse(self) -> bool:
        """The teacher's top-k come from a cache or a server; no teacher model is loaded."""
        return self.cache is not None or self.server is not None

    @property
    def needs_teacher(self) -> bool:
        return not self.sparse

    def describe(self) -> str:
        if self.cache is not None:
            m = self.reader("train").tail_samples
            tail = (
                f" + {m} tail samples per position" if self.uses_tail()
                else f"; its {m} tail samples unused: they estimate forward KL's tail only"
            ) if m else ""  # fmt: skip
            how = f"sparse (top-k teacher cache {self.cache}{tail}, no teacher loaded)"
        elif self.server is not None:
            how = f"sparse (top-k from {self.server}, no teacher loaded)"
        elif self.path == "fused":
            how = f"fused chunked loss ({'compiled' if self.compile else 'eager'})"
        else:
            how = "naive"
        return f"{self.name}: {self.kind}, T={self.temperature}, loss path {how}"

    def reader(self, split: str) -> CacheReader:
        if split not in self.readers:
            self.readers[split] = CacheReader(self.cache, split)
        return self.readers[split]

    def uses_tail(self) -> bool:
        """The cache holds tail samples and the objective is the one they estimate."""
        return (
            self.cache is not None
            and self.kind == "forward_kl"
            and bool(self.reader("train").tail_samples)
        )

    def teacher_tail(self, batch: dict[str, Tensor], mask: Tensor, split: str) -> dict:
        """``teacher_tail`` (N, m) and ``teacher_tail_entropy`` (N,) for the sparse loss, from a
        cache written with ``cache.tail_samples``; empty when unused."""
        if not self.uses_tail():
            return {}
        reader = self.reader(split)
        draws, entropy = reader.tail(batch["example_index"][:, 0].tolist(), mask.sum(1).tolist())
        return {
            "teacher_tail": draws.to(mask.device),
            "teacher_tail_entropy": entropy.to(mask.device),
        }

    def teacher_rows(self, batch: dict[str, Tensor], mask: Tensor, split: str):
        """The teacher's top-k ``(ids (N, k), log-probs (N, k))`` at the batch's supervised
        rows, from the cache (by example index) or the server (scoring the batch's tokens)."""
        if self.server is not None:
            return self.server.rows(batch, mask)
        ids, logprobs = self.reader(split).rows(
            batch["example_index"][:, 0].tolist(), mask.sum(1).tolist()
        )
        return ids.to(mask.device), logprobs.to(mask.device)

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> TokenLevel:
        loss = r.loss
        return cls(
            kind=loss.kind,
            temperature=loss.kd_temperature,
            beta=loss.beta,
            alpha=loss.skew_alpha,
            soft_weight=loss.soft_weight,
            hard_weight=loss.hard_weight,
            vocab_size=vocab_size,
            path=loss.path,
            compile=loss.compile,
            chunk_size=loss.chunk_size,
            cache=r.teacher.cache if r.teacher.source == "cache" else None,
            server=(
                served_teacher(r.teacher, r.cache.top_k, loss.kd_temperature)
                if r.teacher.source == "server"
                else None
            ),
        )

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, Tensor],
        **override: float | str,
    ) -> LossSums:
        """``override`` replaces loss settings for this call (e.g. ``kind``, as method draft's
        warm-up does)."""
        labels = batch["labels"]  # (B, T), already shifted
        mask = labels != self.ignore_index  # (B, T)
        student_h = final_hidden(student, batch)[mask]  # (N, H_s): only supervised positions
        if self.sparse:
            ids, logprobs = self.teacher_rows(batch, mask, "train")  # (N, k), (N, k)
            tail = self.teacher_tail(batch, mask, "train")  # (N, m), (N,) if the cache has them
            return self.sparse_objective(
                student, student_h, labels[mask], ids, logprobs, **tail, **override
            )
        with torch.no_grad():
            teacher_h = final_hidden(teacher, batch)[mask]  # (N, H_t)
        return self.objective(student, teacher, student_h, teacher_h, labels[mask], **override)

    def hyper(self, **override: float | str) -> dict[str, float | str]:
        """The loss functions' settings (divergence, temperature, weights), with overrides."""
        return {
            "kind": self.kind,
            "temperature": self.temperature,
            "beta": self.beta,
            "alpha": self.alpha,
            "soft_weight": self.soft_weight,
            "hard_weight": self.hard_weight,
            "ignore_index": self.ignore_index,
            **override,
        }

    def sparse_objective(
        self,
        student: nn.Module,
        student_h: Tensor,
        labels: Tensor,
        ids: Tensor,
        logprobs: Tensor,
        teacher_tail: Tensor | None = None,
        teacher_tail_entropy: Tensor | None = None,
        **override: float | str,
    ) -> LossSums:
        """The loss against the teacher's top-k at the supervised rows, summed.

        student_h (N, H_s), labels (N,), ids and logprobs (N, k); with tail samples (N, m) and
        their entropy (N,), the forward KL's tail too."""
        weight, bias = lm_head(student, self.vocab_size)
        return sparse_distill_sums(
            student_h,
            weight,
            labels,
            ids,
            logprobs,
            teacher_tail=teacher_tail,
            teacher_tail_entropy=teacher_tail_entropy,
            chunk_size=self.chunk_size,
            student_bias=bias,
            softcap=logit_softcap(student),
            compile=self.compile,
            **self.hyper(**override),
        )

    def objective(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_h: Tensor,
        teacher_h: Tensor,
        labels: Tensor,
        **override: float | str,
    ) -> LossSums:
        """The loss from both models' final hidden states at the supervised rows, summed.

        student_h (N, H_s), teacher_h (N, H_t), labels (N,). ``override`` replaces settings for
        one call (e.g. ``kind="reverse_kl", temperature=1.0`` for a forward-only monitor)."""
        hyper = self.hyper(**override)
        fused = self.path == "fused"
        if fused and (logit_softcap(student) or logit_softcap(teacher)):
            if not self.fallback_said:
                print(
                    "token_level: final-logit soft-capping is not fused; using the naive loss path"
                )
                self.fallback_said = True
            fused = False
        if fused:
            s_weight, s_bias = lm_head(student, self.vocab_size)
            t_weight, t_bias = lm_head(teacher, self.vocab_size)
            return fused_distill_sums(
                student_h,
                s_weight,
                labels,
                teacher_hidden=teacher_h,
                teacher_weight=t_weight,
                student_bias=s_bias,
                teacher_bias=t_bias,
                chunk_size=self.chunk_size,
                compile=self.compile,
                **hyper,
            )
        with torch.no_grad():
            teacher_logits = head_logits(teacher, teacher_h, self.vocab_size)  # (N, V)
        student_logits = head_logits(student, student_h, self.vocab_size)  # (N, V)
        return distillation_sums(student_logits, teacher_logits, labels, **hyper)

    @torch.no_grad()
    def evaluate(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batches: list[dict[str, Tensor]],
        tokenizer,
    ) -> dict[str, float]:
        """With a cache or a served teacher (no teacher model here): held-out forward KL to the
        teacher on its top-k + "other" coarsening, and agreement with its top-1 token."""
        if not self.sparse:
            return {}
        kl, agree, rows = 0.0, 0.0, 0
        for batch in batches:
            mask = batch["labels"] != self.ignore_index  # (B, T)
            ids, logprobs = self.teacher_rows(batch, mask, "eval")  # (N, k)
            hidden = final_hidden(student, batch)[mask]  # (N, H)
            weight, bias = lm_head(student, self.vocab_size)
            sums = sparse_distill_sums(
                hidden, weight, batch["labels"][mask], ids, logprobs,
                temperature=self.temperature, chunk_size=self.chunk_size, student_bias=bias,
                softcap=logit_softcap(student),
            )  # fmt: skip
            (top1,) = chunked_rows(
                lambda h, w, b: (head_logits_fp32(h, w, b).argmax(-1),),
                hidden, weight, bias, (), chunk_size=self.chunk_size,
            )  # fmt: skip
            kl += float(sums.terms["soft"])
            agree += float((top1 == ids[:, 0]).sum())
            rows += int(mask.sum())
        return {
            "teacher_kl_topk": kl / max(rows, 1),
            "top1_agreement_topk": agree / max(rows, 1),
        }
