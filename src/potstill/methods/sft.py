"""Supervised fine-tuning: next-token cross-entropy on the data's labels, no teacher in memory.

Used as the same-budget baseline of every distillation run, and as the training half of
sequence-level distillation (the teacher's text *is* the signal there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from potstill.lm import final_hidden, head_logits
from potstill.losses import LossSums, distillation_sums
from potstill.methods.base import Method

if TYPE_CHECKING:
    from potstill.recipe import Recipe


@dataclass
class SFT(Method, name="sft"):
    vocab_size: int | None = None
    ignore_index: int = -100

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> SFT:
        return cls(vocab_size=vocab_size)

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        labels = batch["labels"]  # (B, T)
        mask = labels != self.ignore_index
        logits = head_logits(student, final_hidden(student, batch)[mask], self.vocab_size)  # (N, V)
        return distillation_sums(
            logits, None, labels[mask], hard_weight=1.0, ignore_index=self.ignore_index
        )
