"""Reading a causal LM as *backbone → final hidden states* and *LM head*, separately.

Distillation losses never need logits at positions without a label, and the fused engine never
needs full ``[tokens, vocab]`` logits at all; both start from the final hidden states. The model is
still called through its own ``forward`` (so DDP/FSDP wrappers see the call) with
an empty ``logits_to_keep`` index, which makes the LM head cost nothing. (``logits_to_keep=1``
slices ``hidden[:, -1:]``, and a linear layer on that strided view copies the whole head.)

Padding-free forward passes. A right-padded batch spends compute on its pads (the demo's chat
batches are 18% padding), and a packed block's attention, given to transformers as one
block-diagonal ``[S, S]`` mask, costs the whole square. So by default :func:`final_hidden` drops
the padding: the real tokens of the batch run as one row ``(1, S)`` with their own positions, and
attention runs document by document (causal SDPA on each slice, a sliding window where the layer
has one), which is what the padded pass computes, up to float rounding. The hidden states are
scattered back to ``(B, T, H)`` (zeros at pads). Measured on a 2-core CPU, fp32, SmolLM2-135M,
batches of 4 chat rows up to 256 tokens: teacher forward 1.9-2.1 -> 1.4-1.5 s, 6-layer student
forward+backward 1.25-1.29 -> 1.09-1.16 s. ``train.padding_free=false`` (or
``with padding_free(False):``) runs the padded batch instead.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from potstill.data import model_inputs
from potstill.errors import RecipeError
from potstill.students import effective_head_weight

PADDING_FREE: ContextVar[bool] = ContextVar("potstill_padding_free", default=True)
VARLEN = "potstill_varlen"  # the attention implementation of padding-free passes


@contextmanager
def padding_free(enabled: bool) -> Iterator[None]:
    """Whether :func:`final_hidden` drops padding inside this block (default: it does)."""
    token = PADDING_FREE.set(enabled)
    try:
        yield
    finally:
        PADDING_FREE.reset(token)


def final_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Final (post-norm) hidden states ``(B, T, H)`` for a collated batch (zeros at padding when
    the pass is padding-free; see the module docstring)."""
    states, keep = _hidden_states(model, batch)
    if keep is None:
        return states[-1]
    packed = states[-1][0]  # (S, H)
    hidden = packed.new_zeros(*keep.shape, packed.shape[-1])  # (B, T, H)
    hidden[keep] = packed
    return hidden


def _hidden_states(
    model: nn.Module, batch: dict[str, Tensor], layout: Layout | None = None
) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """Every layer's hidden states, ``(B, T, H)`` each from a padded pass, or ``(1, S, H)`` from
    a padding-free one together with its ``keep`` mask (B, T) (else None). ``layout``: the
    batch's :func:`token_layout`, when the caller already has it."""
    none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)  # no logits at all
    layout = _documents(model, batch, layout) if PADDING_FREE.get() else None
    if layout is None:
        out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=none)
        return out.hidden_states, None
    keep, positions, documents = layout
    calls = _varlen_attention.calls
    with attention_implementation(model, VARLEN):
        out = model(
            input_ids=batch["input_ids"][keep][None],  # (1, S): the real tokens, row after row
            position_ids=positions[None],  # (1, S)
            attention_mask=None,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=none,
            potstill_documents=documents,  # handed down to _varlen_attention through **kwargs
        )
    if _varlen_attention.calls == calls:  # its attention ignored the switch: documents would mix
        raise RuntimeError(
            f"{type(unwrap(model)).__name__} does not route attention through transformers' "
            "AttentionInterface, so it cannot run padding-free; set train.padding_free=false"
        )
    return out.hidden_states, keep


@dataclass
class Features:
    """What one forward pass says beyond its output, over the batch's real tokens packed row
    after row (S of them; the order of ``batch["attention_mask"]``'s ones)."""

    hidden: tuple[Tensor, ...]  # (S, H) per ``hidden_states`` entry: [0] embeddings, [i+1] layer i
    attention: dict[int, tuple[Tensor, Tensor, Tensor, float]]  # layer -> q, k, v (heads, S, D)
    documents: tuple[tuple[int, int], ...]  # (start, end) of each document in S
    keep: Tensor  # (B, T) bool: the real tokens


def forward_features(
    model: nn.Module, batch: dict[str, Tensor], attention_layers: Sequence[int] = ()
) -> Features:
    """One forward pass keeping every layer's hidden states and, for ``attention_layers``, the
    queries (after rotary embeddings), keys and values their attention used (with its scaling),
    padded or padding-free alike (:func:`_capturing_attention`)."""
    layout = token_layout(batch)
    keep, _, documents = layout
    with capture_attention(model, attention_layers) as store:
        states, packed = _hidden_states(model, batch, layout)
    if packed is None:  # a padded pass: (B, T, ·) -> (S, ·)
        hidden = tuple(h[keep] for h in states)
        attention = {
            i: (*(t.transpose(1, 2)[keep].transpose(0, 1) for t in qkv), scale)
            for i, (*qkv, scale) in store.items()
        }  # (heads, S, D) each
    else:
        hidden = tuple(h[0] for h in states)
        attention = {i: (*(t[0] for t in qkv), scale) for i, (*qkv, scale) in store.items()}
    missing = set(attention_layers) - set(attention)
    if missing:
        raise RuntimeError(f"attention of layers {sorted(missing)} was not seen in the pass")
    return Features(hidden, attention, documents, keep)


@contextmanager
def capture_attention(
    model: nn.Module, layers: Sequence[int]
) -> Iterator[dict[int, tuple[Tensor, Tensor, Tensor, float]]]:
    """Inside this block, the model's calls note the query (after rotary embeddings), key and
    value of ``layers`` as their attention receives them, with its scaling: ``{layer: (q, k, v,
    scale)}``, each (B, heads, T, D) from a padded pass, (1, heads, S, D) from a padding-free one.
    The attention itself runs as it would have (:func:`_capturing_attention`)."""
    store: dict[int, tuple[Tensor, Tensor, Tensor, float]] = {}
    if not layers:
        yield store
        return
    if unwrap(model).config._attn_implementation == "eager":
        raise RecipeError(
            f"{type(unwrap(model)).__name__} runs eager attention (it needs what SDPA lacks, "
            "e.g. soft-capping), whose queries and keys potstill cannot read; drop the attention "
            "terms (their weight = 0)"
        )
    token = _CAPTURING.set((frozenset(layers), store))
    try:
        with _capture(model):
            yield store
    finally:
        _CAPTURING.reset(token)


Layout = tuple[Tensor, Tensor, tuple[tuple[int, int], ...]]  # keep, positions, documents


def token_layout(batch: dict[str, Tensor]) -> Layout:
    """``(keep (B, T) bool, positions (S,), documents)``: the real tokens, their positions, and
    each document's (start, end) among them, packed row after row. Packed rows restart their
    positions at 0 at every document; right-padded rows count 0.. per row. A document starts
    wherever the position does not step by one (transformers' own rule for packed rows,
    ``find_packed_sequence_indices``) and at every row start."""
    keep = batch["attention_mask"].bool()  # (B, T)
    positions = (
        batch["position_ids"][keep]
        if "position_ids" in batch
        else (keep.long().cumsum(1) - 1)[keep]
    )  # (S,)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]  # (S,)
    start = torch.ones_like(positions, dtype=torch.bool)  # (S,)
    start[1:] = (positions[1:] != positions[:-1] + 1) | (rows[1:] != rows[:-1])
    bounds = [*start.nonzero().squeeze(1).tolist(), positions.numel()]  # one host sync
    return keep, positions, tuple(itertools.pairwise(bounds))


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model's calls inside this block with attention implementation ``name`` (one
    registered with transformers' ``AttentionInterface``); transformers reads the config's
    setting at every call, so switching it around a call is how a call picks its attention."""
    if name != CAPTURE and _CAPTURING.get() is not None:  # capturing: CAPTURE stays in front
        token = _INNER.set(name)
        try:
            yield
        finally:
            _INNER.reset(token)
        return
    config = unwrap(model).config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _documents(
    model: nn.Module, batch: dict[str, Tensor], layout: Layout | None = None
) -> Layout | None:
    """The batch's :func:`token_layout` (``layout`` if given) for a padding-free pass, or None
    where a padded pass is what runs: nothing to drop, or a model this path cannot serve."""
    if "position_ids" not in batch and bool(batch["attention_mask"].bool().all()):
        return None  # full rows, one document each: the padded pass is already padding-free
    if not _supports_varlen(unwrap(model)):
        return None
    return layout if layout is not None else token_layout(batch)


def forward_takes_kwargs(model: nn.Module) -> bool:
    """Whether the model's ``forward`` takes ``**kwargs``, which transformers 5 decoders hand
    down to their attention functions (how padding-free passes and compiled decoding pass their
    own arguments)."""
    return _takes_kwargs(type(model))


@functools.cache
def _takes_kwargs(cls: type) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())


def cache_kwarg(model: nn.Module) -> str:
    """The keyword the model's ``forward`` takes its KV cache under: ``cache`` in later
    transformers 5 releases (which deprecate ``past_key_values``, to be removed in 5.40),
    ``past_key_values`` before them. A wrapper whose ``forward`` names neither (a PEFT model)
    passes it on: the first module inside that names one decides."""
    for module in model.modules():  # the model itself first, then what it wraps
        name = _cache_kwarg(type(module))
        if name:
            return name
    return "past_key_values"


@functools.cache
def _cache_kwarg(cls: type) -> str | None:
    names = inspect.signature(cls.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in names), None)


def _supports_varlen(model: nn.Module) -> bool:
    """Padding-free passes need the model to hand its extra keyword arguments down to attention
    (transformers 5 decoders do) and attention SDPA can compute: not ``eager`` (chosen for what
    SDPA lacks, e.g. Gemma 2's logit soft-capping or attention weights as outputs)."""
    config = model.config
    return (
        config._attn_implementation != "eager"
        and not getattr(config, "attn_logit_softcapping", None)
        and forward_takes_kwargs(model)
    )


def _varlen_attention(
    module: nn.Module,
    query: Tensor,  # (1, Hq, S, D)
    key: Tensor,  # (1, Hkv, S, D)
    value: Tensor,  # (1, Hkv, S, D)
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Causal attention within each document of a packed row (see ``AttentionInterface``)."""
    _varlen_attention.calls += 1
    documents = kwargs.get("potstill_documents")
    if documents is None or attention_mask is not None:
        raise RuntimeError(f"{VARLEN} attention runs only inside lm.final_hidden")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"padding-free attention has no `{unsupported}`; set train.padding_free=false"
            )
    window = kwargs.get("sliding_window")  # a key at distance >= window is not seen
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of a split is one concatenation, while each slice's
    # backward writes into a zero tensor of the whole row.
    lengths = [b - a for a, b in documents]
    outs = []
    for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True):
        n, mask = q.shape[2], None
        if window is not None and n > window:
            i = torch.arange(n, device=query.device)
            mask = (i[:, None] >= i[None]) & (i[:, None] - i[None] < window)  # (n, n)
        outs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=gqa,
            )
        )  # (1, Hq, n, D)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, S, Hq, D)


_varlen_attention.calls = 0  # checked by final_hidden: the model really used it
AttentionInterface.register(VARLEN, _varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, lambda *args, **kwargs: None)  # per document

# Reading a pass's attention inputs: the model runs attention implementation CAPTURE, which notes
# the query, key and value of the layers asked for and hands the call on to the implementation
# the pass would have used (its mask function likewise).
CAPTURE = "potstill_capture"
_CAPTURING: ContextVar[tuple[frozenset[int], dict] | None] = ContextVar(
    "potstill_capturing", default=None
)
_INNER: ContextVar[str] = ContextVar("potstill_capture_inner", default="sdpa")


@contextmanager
def _capture(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through :func:`_capturing_attention` inside this block; a
    padding-free pass's switch to VARLEN then changes the implementation behind it."""
    config = unwrap(model).config
    inner = _INNER.set(config._attn_implementation)
    try:
        with attention_implementation(model, CAPTURE):
            yield
    finally:
        _INNER.reset(inner)


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    layers, store = _CAPTURING.get()
    if getattr(module, "layer_idx", None) in layers:
        store[module.layer_idx] = (query, key, value, kwargs.get("scaling") or module.scaling)
    return AttentionInterface()[_INNER.get()](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capturing_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(
    CAPTURE, lambda *args, **kwargs: ALL_MASK_ATTENTION_FUNCTIONS[_INNER.get()](*args, **kwargs)
)


def lm_head(model: nn.Module, vocab_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The output projection as ``(weight (V, H), bias (V,) or None)``, sliced to ``vocab_size``
    (padded embedding rows are not real tokens)."""
    head = unwrap(model).get_output_embeddings()
    weight, bias = effective_head_weight(head), getattr(head, "bias", None)
    if _sharded(weight):
        raise RecipeError(
            f"the LM head's weight is sharded across processes ({type(weight).__name__} of "
            f"shape {tuple(weight.shape)}) where a loss reads it: potstill's loop keeps the head "
            "whole where the losses read it (FSDP2: its units gathered from the forward to the "
            "backward; ZeRO-3: a persistent parameter; potstill.distributed.prepare_student); a "
            "model sharded elsewhere, or a head read before the forward, sees the shard. Train "
            "with `potstill train` launched with a config from configs/accelerate/"
        )
    if vocab_size is not None and vocab_size < weight.shape[0]:
        # (a no-op slice still costs: its backward writes the gradient into a fresh (V, H) zeros)
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def _sharded(weight: Tensor) -> bool:
    """Whether ``weight`` is a shard, not the whole matrix: a DTensor (FSDP2), or the empty
    placeholder FSDP1 (``use_orig_params``) and ZeRO-3 leave between forwards."""
    if weight.ndim != 2 or weight.numel() == 0:
        return True
    if not torch.distributed.is_available():  # builds without distributed have no DTensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


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


def token_logprobs(
    model: nn.Module,
    hidden: Tensor,
    tokens: Tensor,
    vocab_size: int | None = None,
    chunk: int = 512,
) -> Tensor:
    """log softmax(``model``'s head on ``hidden``) at ``tokens``: (N, H), (N,) -> (N,) fp32.

    Over chunks of positions, each recomputed in the backward pass when gradients flow, so no
    ``(N, V)`` logits outlive their chunk."""
    from torch.utils.checkpoint import checkpoint

    def one(h: Tensor, y: Tensor) -> Tensor:
        logits = head_logits(model, h, vocab_size).float()  # (n, V)
        return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)  # (n,)

    grad = torch.is_grad_enabled()
    parts = [
        checkpoint(one, hidden[s : s + chunk], tokens[s : s + chunk], use_reentrant=False)
        if grad
        else one(hidden[s : s + chunk], tokens[s : s + chunk])
        for s in range(0, len(tokens), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
