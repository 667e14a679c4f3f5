"""Token-level logit distillation (Hinton et al. 2015; the white-box KD of DistillKit / GKD λ=0).

Sequences: the dataset (gold text or chat, loss on assistant/completion tokens only).
Teacher signal: the live teacher's full next-token distribution at every supervised position,
computed under ``no_grad`` from its final hidden states and LM head.
Objective: ``soft_weight · divergence(student ‖ teacher) + hard_weight · cross-entropy``.
Student and teacher must share a vocabulary (``potstill check`` verifies it).

Two paths compute the same loss: ``fused`` (default) projects hidden states through both LM heads a
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
from potstill.methods.base import Method

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
    fallback_said: bool = field(default=False, repr=False)  # the naive-fallback note, once

    def describe(self) -> str:
        how = (
            f"fused chunked loss ({'compiled' if self.compile else 'eager'})"
            if self.path == "fused"
            else "naive"
        )
        return f"token_level: {self.kind}, T={self.temperature}, loss path {how}"

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
        )

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        labels = batch["labels"]  # (B, T), already shifted
        mask = labels != self.ignore_index  # (B, T)
        student_h = final_hidden(student, batch)[mask]  # (N, H_s): only supervised positions
        with torch.no_grad():
            teacher_h = final_hidden(teacher, batch)[mask]  # (N, H_t)
        return self.objective(student, teacher, student_h, teacher_h, labels[mask])

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
        hyper = dict(
            kind=self.kind,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.alpha,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            ignore_index=self.ignore_index,
        )
        hyper.update(override)
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
