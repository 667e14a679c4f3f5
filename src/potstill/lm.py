"""Reading a causal LM as *backbone → final hidden states* and *LM head*, separately.

Distillation losses never need logits at positions without a label, and the fused engine never
needs full ``[tokens, vocab]`` logits at all; both start from the final hidden states. The model is
still called through its own ``forward`` (so DDP/FSDP wrappers see the call) with
an empty ``logits_to_keep`` index, which makes the LM head cost nothing. (``logits_to_keep=1``
slices ``hidden[:, -1:]``, and a linear layer on that strided view copies the whole head.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potstill.data import model_inputs


def final_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Final (post-norm) hidden states ``(B, T, H)`` for a collated batch."""
    none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)  # no logits at all
    out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=none)
    return out.hidden_states[-1]


def lm_head(model: nn.Module, vocab_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The output projection as ``(weight (V, H), bias (V,) or None)``, sliced to ``vocab_size``
    (padded embedding rows are not real tokens)."""
    head = unwrap(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-capping value (Gemma 2), or None."""
    return getattr(unwrap(model).config, "final_logit_softcapping", None) or None


def head_logits(model: nn.Module, hidden: Tensor, vocab_size: int | None = None) -> Tensor:
    """Logits for selected hidden states: ``(N, H) -> (N, V)``, sliced to ``vocab_size``.

    Applies the model's final-logit soft-capping when its config has one.
    """
    weight, bias = lm_head(model, vocab_size)
    logits = nn.functional.linear(hidden, weight, bias)  # (N, V)
    cap = logit_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
