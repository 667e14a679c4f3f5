"""``method: draft`` — a speculative-decoding draft distilled for acceptance.

The teacher is the *target* model, the student the *draft*. In speculative sampling the target
accepts a drafted token with probability 1 − TVD(p_target, q_draft) at that position
(:mod:`potstill.losses.acceptance`), so the objective is the total variation distance itself
(``loss.kind: tvd``, this method's default), optionally after ``draft.kl_warmup_steps`` of forward
KL — TVD's gradient vanishes wherever the draft already covers the target, and forward KL moves
a far-off draft faster. Everything else is token-level KD (:class:`TokenLevel`: the fused loss,
live teacher). Data: the dataset, or the target's own completions from ``potstill generate``
(the distribution a draft meets in decoding).

Held-out, besides the loop's own metrics: the expected acceptance per position (sampling at
T = 1, and greedy) and the expected tokens per target pass for ``draft.gamma`` drafted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from potstill.lm import final_hidden, head_logits
from potstill.losses import LossSums
from potstill.losses.acceptance import acceptance, expected_tokens_per_pass, greedy_acceptance
from potstill.methods.base import Method
from potstill.methods.token_level import TokenLevel

if TYPE_CHECKING:
    from potstill.recipe import Recipe


@dataclass
class Draft(Method, name="draft"):
    kd: TokenLevel  # the divergence (tvd by default), fused path, vocabulary
    kl_warmup_steps: int = 0  # optimizer steps of forward KL before kd.kind takes over
    gamma: int = 4  # drafted tokens per target pass, for the held-out estimate
    step: int = 0  # the optimizer step being trained (from `sequences`)

    @classmethod
    def from_recipe(cls, r: Recipe, *, vocab_size: int | None) -> Draft:
        # (recipe.validate keeps the target live: caches and servers are token_level's)
        return cls(
            kd=TokenLevel.from_recipe(r, vocab_size=vocab_size),
            kl_warmup_steps=r.draft.kl_warmup_steps,
            gamma=r.draft.gamma,
        )

    @property
    def ignore_index(self) -> int:
        return self.kd.ignore_index

    def describe(self) -> str:
        warm = f"forward KL for {self.kl_warmup_steps} steps, then " if self.kl_warmup_steps else ""
        return f"{self.name}: {warm}{self.kd.describe().split(': ', 1)[1]}; γ={self.gamma}"

    def kind_at(self, step: int) -> str:
        """The divergence trained at optimizer step ``step`` (0-based)."""
        return "forward_kl" if step < self.kl_warmup_steps else self.kd.kind

    def sequences(self, batch: dict[str, Tensor], *, step: int, **_: Any) -> dict[str, Tensor]:
        self.step = step  # the data's own sequences; only the step is read
        return batch

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        return self.kd.loss(student, teacher, batch, kind=self.kind_at(self.step))

    @torch.no_grad()
    def evaluate(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batches: list[dict[str, Tensor]],
        tokenizer: Any,
    ) -> dict[str, float]:
        """Expected acceptance (T = 1: 1 − TVD; greedy: argmax agreement) per supervised
        position, and expected tokens per target pass for γ drafted tokens, teacher-forced on
        the held-out sequences."""
        if teacher is None:
            return {}
        sums = torch.zeros(6)  # α sum, greedy α sum, positions, tokens/pass (T=1, greedy), starts
        for batch in batches:
            mask = batch["labels"] != self.ignore_index  # (B, T)
            s = head_logits(student, final_hidden(student, batch)[mask], self.kd.vocab_size)
            t = head_logits(teacher, final_hidden(teacher, batch)[mask], self.kd.vocab_size)
            alpha = torch.zeros(mask.shape)  # (B, T)
            greedy = torch.zeros(mask.shape)
            alpha[mask.cpu()] = acceptance(t.log_softmax(-1), s.log_softmax(-1)).cpu()
            greedy[mask.cpu()] = greedy_acceptance(t, s).cpu()
            per_pass, starts = expected_tokens_per_pass(alpha, mask.cpu(), self.gamma)
            per_pass_greedy, _ = expected_tokens_per_pass(greedy, mask.cpu(), self.gamma)
            sums += torch.stack([
                alpha.sum(), greedy.sum(), mask.sum().float().cpu(),
                per_pass, per_pass_greedy, starts,
            ])  # fmt: skip
        positions, starts = sums[2].clamp(min=1), sums[5].clamp(min=1)
        return {
            "acceptance": float(sums[0] / positions),
            "acceptance_greedy": float(sums[1] / positions),
            f"tokens_per_pass_g{self.gamma}": float(sums[3] / starts),
            f"tokens_per_pass_greedy_g{self.gamma}": float(sums[4] / starts),
        }
