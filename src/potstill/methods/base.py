"""The contract between a method and the one training loop (:func:`potstill.train.train`).

A method says which sequences a step trains on, what the teacher says about them and which
objective turns that into a loss. The loop calls every hook below on every method; each hook but
:meth:`Method.loss` and :meth:`Method.from_recipe` has a default that does nothing, so a method
overrides only what it changes. Nothing else of a method is ever probed.

One optimizer step, as the loop drives it::

    micro = [method.sequences(b, ...) for b in next grad_accum batches]   # e.g. on-policy samples
    stop = method.stop_reason()        # reduced over processes with the token count below
    normalizer = Σ method.count_tokens(b) over micro-batches and processes
    for b in micro: normalise(method.loss(student, teacher, b), normalizer).backward()
    log row |= method.pop_stats();  raise if stop on any process
    held-out metrics |= method.evaluate(...)

The optimizer trains the student's parameters and those of :meth:`Method.trainable_modules`
(e.g. projectors, built in :meth:`Method.attach`), and checkpoints them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from potstill.losses.objective import LossSums
from potstill.methods.registry import METHODS, MethodInfo

if TYPE_CHECKING:
    from pathlib import Path

    from potstill.data import Example
    from potstill.recipe import Recipe


class Method:
    """Base class of every method; subclasses set ``info`` to their registry entry."""

    info: ClassVar[MethodInfo]
    ignore_index: int = -100  # labels that carry no loss

    def __init_subclass__(cls, name: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if name is not None:
            cls.info = METHODS[name]

    # --- what the registry says ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def needs_teacher(self) -> bool:
        return self.info.needs_teacher

    @property
    def shared_vocabulary(self) -> bool:
        """Teacher and student logits compare entry by entry (held-out teacher KL is defined)."""
        return self.info.shared_vocabulary

    # --- required ------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, vocab_size: int | None) -> Method:
        """The method as the recipe configures it; ``vocab_size``: the shared vocabulary."""
        raise NotImplementedError

    def loss(
        self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]
    ) -> LossSums:
        """The micro-batch's weighted loss and its terms, *summed* over supervised tokens; the
        loop divides them once by the step's token count (never divide here)."""
        raise NotImplementedError

    # --- hooks with no-op defaults --------------------------------------------------------------

    def describe(self) -> str:
        """One line the run prints at its start: which loss path runs, with which settings."""
        return self.name

    def bind(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        """Called once with both tokenizers before data is read (cross-tokenizer needs both)."""

    encodes_records: ClassVar[bool] = False  # True: records are read through `example`

    def example(self, record: dict, *, max_length: int) -> tuple[Example, bool]:
        """``(example, truncated)`` for one record, where the method reads records its own way
        (``encodes_records``); the default reading is :func:`potstill.data.tokenize_record`."""
        raise NotImplementedError(f"{self.name} reads records with the default tokenizer")

    def sequences(
        self,
        batch: dict[str, Tensor],
        *,
        student: nn.Module,
        teacher: nn.Module | None,
        tokenizer: Any,
        step: int,
        index: int,
    ) -> dict[str, Tensor]:
        """Micro-batch ``index`` of optimizer step ``step`` as it is trained on; the default
        keeps the data's sequences (on-policy replaces completions with samples)."""
        return batch

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """Supervised tokens of a micro-batch: what the step's loss is divided by."""
        return (batch["labels"] != self.ignore_index).sum()

    def pop_stats(self) -> dict[str, float]:
        """Method statistics since the last call, added to the next log row."""
        return {}

    def stop_reason(self) -> str | None:
        """Asked once a step's sequences are written, on every process: why the run must stop
        (any process's reason stops them all once this step is logged, before it evaluates or
        saves), or None to go on."""
        return None

    def evaluate(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batches: list[dict[str, Tensor]],
        tokenizer: Any,
    ) -> dict[str, float]:
        """Held-out metrics beyond the loop's own (teacher KL, agreement, perplexity, bpb)."""
        return {}

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once with the run's models before the optimizer is built: a method that trains
        modules of its own sizes them here (the global seed is already set)."""

    def finish(self, model_dir: Path) -> None:
        """Called once the student is saved to ``model_dir`` (main process): files a saved
        student needs beside its weights (e.g. sentence-transformers' pooling modules)."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the method trains besides the student (e.g. projectors), by name; optimised
        and checkpointed with the student, saved beside it as ``NAME.safetensors`` at the end
        of the run, never exported with it."""
        return {}
