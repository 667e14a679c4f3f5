"""Methods: named presets of *sequences × teacher signal × objective*.

A method is one small class with ``needs_teacher`` and ``loss(student, teacher, batch, normalizer)``;
the one training loop in :mod:`potstill.train` drives every method. Adding a method means adding a
file here and registering it. Optional hooks the loop calls when a method has them:
``sequences(batch, *, student, teacher, tokenizer, step, index)`` rewrites a micro-batch before
its tokens are counted (on-policy sampling), ``pop_stats()`` adds to each log row,
``evaluate(student, teacher, eval_batches, tokenizer)`` adds held-out metrics.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from potstill.recipe import Recipe


class Method(Protocol):
    name: str
    needs_teacher: bool

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, Tensor],
        normalizer: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss normalised by ``normalizer`` valid tokens, detached terms for logging)"""
        ...


METHODS: dict[str, type] = {}


def register(name: str):
    def wrap(cls: type) -> type:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def build_method(recipe: Recipe, *, vocab_size: int | None) -> Method:
    """Instantiate the recipe's method; ``vocab_size`` is the shared vocabulary from preflight."""
    return METHODS[recipe.method].from_recipe(recipe, vocab_size=vocab_size)


# Registration happens on import.
from potstill.methods import (  # noqa: E402, F401
    cross_tokenizer,
    on_policy,
    sequence_level,
    sft,
    token_level,
)
