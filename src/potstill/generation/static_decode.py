"""Compiled decoding for ``HFBackend(compile=True)``: a static KV cache and a ``torch.compile``d
decode step.

One decode step of a small model is a few matmuls wrapped in dozens of small ops per layer (norms,
rotary embedding, cache update, mask, attention, activations), each a Python call and a kernel
launch. ``torch.compile`` fuses those into a handful of kernels, but only for shapes it has seen,
so the step runs on fixed shapes:

  * a ``StaticCache`` whose length is the batch's prompt width plus ``max_new_tokens``, rounded
    up to a multiple of ``BUCKET`` (few distinct shapes, few compilations), kept between batches;
  * a fixed batch: a row that finishes stays in the batch, is fed the pad token, and its logits
    are dropped, instead of being cut out of the cache as the dynamic path does;
  * an attention mask over the whole cache, its column for the step's slot set before the step.

Attention of the single new query runs as an opaque op around ``F.scaled_dot_product_attention``
(``potstill::decode_sdpa``). Left to inductor, SDPA is decomposed and the query's rotary
embedding is recomputed, sin and cos per element, inside the QK reduction for every cached
position: 0.7-0.8 ms per layer on a 2-core CPU for SmolLM2 at 4 rows and 286 positions, against
0.3-0.4 ms for the ATen kernel (measured).

Measured there (SmolLM2-135M pruned to 6 layers, 4 rows, fp32, weight-first linears): 30 ms per
step eager with a DynamicCache, 26 ms eager with a StaticCache, 24 ms compiled with inductor's own
attention, 18 ms compiled with this op, 14-16 ms with the refinements below (the filled slots
only, fewer guards); the weight matmuls alone take ~13 ms. Compiling costs ~25-35 s the first
time on a machine and ~5-7 s once inductor's on-disk cache is warm.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, Cache, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from potstill.lm import attention_implementation, cache_kwarg, forward_takes_kwargs

ATTENTION = "potstill_decode"  # the attention implementation the compiled step runs under
BUCKET = 512  # static cache lengths are multiples of this: one shape for most prompts


@torch.library.custom_op("potstill::decode_sdpa", mutates_args=())
def decode_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    length: Tensor | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` as one op inductor does not look into.

    query (B, Hq, Q, D), key and value (B, Hkv, K, D) with Hq a multiple of Hkv, mask
    (B, 1, Q, K) bool or None -> (B, Hq, Q, D), contiguous. Causal only through the mask, except
    when it is None and Q > 1 (then causal, as transformers' sdpa path does).

    ``length`` (a one-element CPU tensor), when given, is how many leading cache slots hold
    tokens: the static cache's unfilled tail is masked anyway, and skipping it saves ~25% of the
    attention time at typical fills (0.41 -> 0.30 ms per layer, SmolLM2, 4 rows, 512 slots).
    """
    if length is not None and query.shape[2] == 1:
        n = int(length)
        key, value = key[:, :, :n], value[:, :, :n]
        mask = None if mask is None else mask[..., :n]
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None and query.shape[2] > 1,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    ).contiguous()


@decode_sdpa.register_fake
def _(query, key, value, mask, scale, length=None):
    return query.new_empty(query.shape)


def _attention(
    module: nn.Module,
    query: Tensor,  # (B, Hq, Q, D)
    key: Tensor,  # (B, Hkv, K, D)
    value: Tensor,  # (B, Hkv, K, D)
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function (see ``AttentionInterface``) over :func:`decode_sdpa`."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTENTION} attention has no logit soft-capping; compile=False decodes")
    if dropout:
        raise ValueError(f"{ATTENTION} attention is for eval-mode decoding (dropout {dropout})")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError(f"{ATTENTION} attention takes a bool mask; got {attention_mask.dtype}")
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    length = kwargs.get("decode_length")  # passed down by StaticRows.step where the model does
    out = decode_sdpa(query.contiguous(), key, value, attention_mask, float(scale), length)
    return out.transpose(1, 2).contiguous(), None  # (B, Q, Hq, D), as transformers expects


AttentionInterface.register(ATTENTION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # bool masks, as for sdpa


def prefill(
    model: nn.Module,
    prompts: list[list[int]],  # one per row
    pad_id: int,
    cache: Cache,  # empty
    *,
    logits_to_keep: bool,  # the model's forward takes logits_to_keep
    columns: int | None = None,  # width of the returned mask; default the longest prompt
) -> tuple[Tensor, Tensor, Tensor]:
    """Run left-padded ``prompts`` through ``model`` into ``cache`` (both decoding paths).

    -> the last position's logits (P, V) float32, the attention mask (P, columns) long with 1 on
    prompt tokens, and each row's next position (P, 1). Positions count real tokens only (pads
    get position 0, as transformers' ``generate`` does).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (P, W)
    attention = torch.zeros((len(prompts), columns or width), dtype=torch.long)  # (P, C)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) : width] = 1
    positions = (attention[:, :width].cumsum(-1) - 1).clamp_min(0)  # (P, W)
    input_ids, attention, positions = (t.to(device) for t in (input_ids, attention, positions))
    # An index tensor, not the int 1: transformers slices hidden[:, -1:] for an int, and a linear
    # layer on that strided 3-D view expands and copies the whole head per row (237 ms instead
    # of 4.6 ms for SmolLM2's bf16 head at batch 4, measured).
    extra = {"logits_to_keep": torch.tensor([width - 1], device=device)} if logits_to_keep else {}
    if isinstance(cache, StaticCache):  # the slots it writes
        extra["cache_position"] = torch.arange(width, device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention[:, :width],
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(model): cache},
        **extra,
    )
    return out.logits[:, -1].float(), attention, positions[:, -1:] + 1


class StaticDecoder:
    """A model's compiled decode step and its static KV cache (one at a time, reused)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # decode_length travels to the attention function through the model's **kwargs
        self.passes_kwargs = forward_takes_kwargs(model)
        self.cache_kwarg = cache_kwarg(model)  # the keyword forward takes the KV cache under
        # dynamic=None: the first shape compiles as is; a second batch size or cache length
        # recompiles once with that dimension symbolic. (inductor's C++ wrapper, cpp_wrapper,
        # took 10-20% off a SmolLM2 step in two alternating comparisons on a 2-core CPU and
        # nothing in two others, for a first compilation of ~30 s instead of ~7 s: not used.)
        self._compiled = torch.compile(self._forward)
        self.compiled = True  # False once compiling failed and steps run eagerly
        self._cache: StaticCache | None = None
        self._cache_key: tuple[int, int] | None = None

    def _forward(self, **inputs) -> Tensor:
        return self.model(**inputs).logits[:, -1]  # (B, V)

    def step(self, *, same_as_last: bool = False, **inputs) -> Tensor:
        """The model's last-position logits (B, V) for one decode step, compiled if it can be.

        ``same_as_last``: the inputs have the shapes of the previous step and the model has not
        changed (a later step of one batch), so dynamo checks only the guards that tell its
        compiled graphs apart, not all of them (0.8 ms a step for SmolLM2's 6 layers).
        """
        if self.compiled:
            try:
                if same_as_last:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        return self._compiled(**inputs)
                return self._compiled(**inputs)
            except Exception as err:  # no C++ compiler, an op dynamo cannot trace, ...
                self.compiled = False
                warnings.warn(
                    f"torch.compile of the decode step failed ({type(err).__name__}: "
                    f"{str(err)[:300]}); decoding eagerly on the static cache from now on. "
                    "compile=False (on_policy.compile=false) skips the attempt",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._forward(**inputs)  # a step that failed half-way rewrites the same slot

    def cache(self, rows: int, length: int) -> tuple[StaticCache, int]:
        """An empty static cache for ``rows`` rows of at least ``length`` positions, and its
        length. The previous one is reset and reused when it has as many rows and is long enough
        (a new length is a new shape, which compiles again), else replaced by a longer one."""
        if self._cache is not None and self._cache_key[0] == rows and self._cache_key[1] >= length:
            self._cache.reset()
            return self._cache, self._cache_key[1]
        length = -(-length // BUCKET) * BUCKET
        if self._cache_key is not None and self._cache_key[0] == rows:
            length = max(length, self._cache_key[1])
        self._cache = None  # free it before allocating the next
        self._cache = StaticCache(config=self.model.config, max_cache_len=length)
        self._cache_key = (rows, length)
        return self._cache, length


class StaticRows:
    """The rows of one batch decoded on fixed shapes (see the module doc); the counterpart of
    ``hf._GrowingRows`` with the same three calls: ``logits`` after prefill, ``keep`` and
    ``step``."""

    def __init__(
        self,
        decoder: StaticDecoder,
        prompts: list[list[int]],  # one per row (rows of one prompt repeat it)
        max_new_tokens: int,
        pad_id: int,
        logits_to_keep: bool,
    ) -> None:
        device = next(decoder.model.parameters()).device
        self.decoder, self.pad_id = decoder, pad_id
        rows, width = len(prompts), max(len(p) for p in prompts)
        self.cache, length = decoder.cache(rows, width + max_new_tokens)
        # Prefill runs eagerly: prompt widths vary from batch to batch. The mask spans the whole
        # cache, (B, S), its columns set one per step.
        self.logits, self.attention, self.next_position = prefill(
            decoder.model,
            prompts,
            pad_id,
            self.cache,
            logits_to_keep=logits_to_keep,
            columns=length,
        )
        self.slot = width  # the cache slot of the next token
        self.live = torch.arange(rows, device=device)  # (b,) batch rows still decoding
        self.tokens = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)  # (B, 1)
        self.stepped = False  # the first step checks every guard (and compiles if need be)

    def keep(self, index: Tensor) -> None:
        """Keep decoding only the live rows at ``index`` (positions in the live order)."""
        self.live = self.live[index]

    def step(self, chosen: Tensor) -> Tensor:
        """Feed the live rows' tokens (b,); -> their next logits (b, V) float32."""
        self.tokens.fill_(self.pad_id)
        self.tokens[self.live, 0] = chosen
        self.attention[:, self.slot] = 1
        slot = torch.tensor([self.slot], device=self.attention.device)  # (1,)
        extra = {}
        if self.decoder.passes_kwargs:  # CPU tensor: read by decode_sdpa without a device sync
            extra["decode_length"] = torch.tensor(self.slot + 1)
        with attention_implementation(self.decoder.model, ATTENTION):
            logits = self.decoder.step(
                same_as_last=self.stepped,
                input_ids=self.tokens,  # (B, 1)
                attention_mask=self.attention,  # (B, S)
                position_ids=self.next_position,  # (B, 1)
                cache_position=slot,
                **{self.decoder.cache_kwarg: self.cache},
                use_cache=True,
                **extra,  # transformers hands extra kwargs down to the attention function
            )  # (B, V)
        self.next_position = self.next_position + 1
        self.slot = self.slot + 1
        self.stepped = True
        if len(self.live) < len(self.tokens):
            logits = logits[self.live]  # (b, V)
        return logits.float()
