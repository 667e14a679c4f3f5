"""The demo pair and data every benchmark here runs on: SmolLM2-135M-Instruct as teacher, the same
model pruned to 6 of its 30 layers as student, bundled gsm_symbolic chat records."""

from __future__ import annotations


def models():
    """(teacher frozen in eval mode, student trainable, tokenizer)."""
    from potstill.models import load_model, load_tokenizer, prune_layers

    teacher = load_model("bundled:smollm2-135m-instruct").eval().requires_grad_(False)
    student = prune_layers(
        load_model("bundled:smollm2-135m-instruct"), [0, 6, 12, 18, 24, 29]
    ).requires_grad_(True)
    return teacher, student, load_tokenizer("bundled:smollm2-135m-instruct")


def records(n: int):
    """The first ``n`` bundled gsm_symbolic training records."""
    from potstill.data import load_records

    return load_records("bundled:rg/gsm_symbolic", limit=n)
