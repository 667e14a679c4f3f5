"""Supervised fine-tuning: next-token cross-entropy on the data's labels, no teacher in memory.

Used as the same-budget baseline of every distillation run, and as the training half of
sequence-level distillation (the teacher's text *is* the signal there).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from potstill.lm import final_hidden, head_logits
from potstill.losses import distillation_loss
from potstill.methods import register
from potstill.recipe import Recipe


@register("sft")
@dataclass
class SFT:
    vocab_size: int | None = None
    ignore_index: int = -100
    needs_teacher = False

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> SFT:
        return cls(vocab_size=vocab_size)

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, Tensor],
        normalizer: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["labels"]  # (B, T)
        mask = labels != self.ignore_index
        logits = head_logits(student, final_hidden(student, batch)[mask], self.vocab_size)  # (N, V)
        return distillation_loss(
            logits,
            None,
            labels[mask],
            hard_weight=1.0,
            ignore_index=self.ignore_index,
            normalizer=normalizer,
        )
