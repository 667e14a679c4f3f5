"""Every method by name, with what a recipe check needs to know of it.

Validating a recipe (``potstill check``, ``potstill keys``) reads this table and nothing else: a
method's implementation (torch, transformers, generation backends) is imported only when a run
builds it (:func:`build_method`). Adding a method = one file in ``potstill/methods/`` with a
:class:`potstill.methods.base.Method` subclass, and one entry here.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from potstill.errors import RecipeError

if TYPE_CHECKING:
    from potstill.methods.base import Method
    from potstill.recipe import Recipe


@dataclass(frozen=True)
class MethodInfo:
    name: str
    target: str  # "module:Class" of the implementation, imported by method_class()
    summary: str  # one line: `potstill keys`, the methods table of the docs
    needs_teacher: bool  # a teacher model is loaded for training
    default_kind: str = "forward_kl"  # loss.kind when the recipe leaves it unset
    shared_vocabulary: bool = True  # teacher and student logits are compared entry by entry
    packing: bool = True  # rows may be packed (data.packing)
    encoder: bool = False  # the models are bidirectional encoders (no LM head, no LM metrics)
    samples: bool = False  # its sequences are the student's own samples, drawn during training


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            "token_level",
            "potstill.methods.token_level:TokenLevel",
            "logit KD from a live teacher",
            needs_teacher=True,
        ),
        MethodInfo(
            "feature",
            "potstill.methods.feature:Feature",
            "logit KD plus the teacher's hidden states and attention; see the feature section",
            needs_teacher=True,
        ),
        MethodInfo(
            "embedding",
            "potstill.methods.embedding:Embedding",
            "a sentence-embedding student (e.g. a pruned all-MiniLM-L6-v2); see the embedding "
            "section",
            needs_teacher=True,
            shared_vocabulary=False,  # no logits: nothing compared entry by entry
            packing=False,  # one sentence per row
            encoder=True,
        ),
        MethodInfo(
            "sft",
            "potstill.methods.sft:SFT",
            "cross-entropy only, no teacher",
            needs_teacher=False,
        ),
        MethodInfo(
            "sequence_level",
            "potstill.methods.sequence_level:SequenceLevel",
            "cross-entropy on teacher completions written by `potstill generate`; no teacher "
            "while training",
            needs_teacher=False,
        ),
        MethodInfo(
            "on_policy",
            "potstill.methods.on_policy:OnPolicy",
            "GKD: the student samples, the teacher grades every token; see the on_policy section",
            needs_teacher=True,
            default_kind="reverse_kl",  # GKD and MiniLLM
            packing=False,  # a completion is sampled per prompt row
            samples=True,
        ),
        MethodInfo(
            "draft",
            "potstill.methods.draft:Draft",
            "a speculative-decoding draft for the teacher (the target): TVD, the acceptance "
            "objective; see the draft section",
            needs_teacher=True,
            default_kind="tvd",  # 1 − TVD is the per-token acceptance probability
        ),
        MethodInfo(
            "cross_tokenizer",
            "potstill.methods.cross_tokenizer:CrossTokenizer",
            "teacher and student with different tokenizers; see the cross_tokenizer section",
            needs_teacher=True,
            shared_vocabulary=False,
            packing=False,  # each record's two tokenizations are aligned
        ),
    )
}


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``, or a RecipeError naming the closest method."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise RecipeError(f"`method: {name}` is unknown; choose one of {sorted(METHODS)}{hint}")
    return METHODS[name]


def method_class(name: str) -> type[Method]:
    """The implementation of method ``name`` (imported here, on first use)."""
    module, cls = method_info(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(recipe: Recipe, *, vocab_size: int | None) -> Method:
    """Instantiate the recipe's method; ``vocab_size`` is the shared vocabulary from preflight."""
    return method_class(recipe.method).from_recipe(recipe, vocab_size=vocab_size)
