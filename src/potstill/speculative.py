"""Speculative decoding, measured: a target model with a draft against the target alone.

Decoding runs through transformers' assisted generation (``generate(assistant_model=draft)``):
the draft proposes ``gamma`` tokens, the target scores them in one forward pass and keeps the
longest prefix it agrees with (greedy) or accepts each with probability min(1, p/q) (sampling,
Leviathan et al. 2023), plus one token of its own. The draft drafts exactly ``gamma`` tokens per
pass here (a constant schedule, no confidence cut-off), so the counts below are the algorithm's,
not a heuristic's.

Measured per prompt, summed: new tokens, the target's forward passes (a forward pre-hook counts
them), wall-clock seconds; at greedy, also the target alone on the same prompts and lengths, and
whether the two outputs are identical token for token (speculative decoding is lossless). Every
generation is forced to ``max_new_tokens`` (end tokens suppressed), so both runs decode the same
number of tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Decoded:
    tokens: int = 0  # new tokens
    target_passes: int = 0  # the target's forward passes
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)  # new token ids, per prompt


@contextlib.contextmanager
def counting_passes(model: nn.Module) -> Iterator[list[int]]:
    """Counts ``model``'s forward calls while the block runs: ``[count]``."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def decode(
    target: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    draft: nn.Module | None = None,
    gamma: int = 4,
    temperature: float = 0.0,
    seed: int = 0,
    pad_token_id: int = 0,
    desc: str | None = None,
) -> Decoded:
    """Decode each prompt (one at a time: assisted generation takes batch size 1) with the
    target, helped by ``draft`` when given; greedy at ``temperature`` 0, else sampling."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "pad_token_id": pad_token_id,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    if draft is not None:
        config = draft.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft
    out = Decoded()
    for i, prompt in enumerate(tqdm(prompts, desc=desc, disable=desc is None, leave=False)):
        ids = torch.tensor([prompt])
        torch.manual_seed(seed + i)
        with counting_passes(target) as passes, torch.no_grad():
            start = time.perf_counter()
            generated = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            out.seconds += time.perf_counter() - start
        new = generated[0, len(prompt) :].tolist()
        out.tokens += len(new)
        out.target_passes += passes[0]
        out.outputs.append(new)
    return out


def measure(
    target: nn.Module,
    draft: nn.Module,
    prompts: list[list[int]],
    *,
    gamma: int,
    max_new_tokens: int,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    seed: int = 0,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """Real speculative decoding of ``prompts``: tokens per target pass and the drafted tokens'
    acceptance rate at each temperature; at greedy, tokens/s of the target alone and with the
    draft, their ratio, and the share of prompts whose outputs are identical."""
    target.eval()
    draft.eval()
    common = {"max_new_tokens": max_new_tokens, "seed": seed, "pad_token_id": pad_token_id}
    decode(target, prompts[:1], draft=draft, gamma=gamma, **common)  # warm-up: caches, kernels
    decode(target, prompts[:1], **common)
    result: dict[str, float] = {}
    for temperature in temperatures:
        tag = "greedy" if temperature == 0 else f"t{temperature:g}"
        helped = decode(
            target, prompts, draft=draft, gamma=gamma, temperature=temperature, **common
        )
        per_pass = helped.tokens / max(helped.target_passes, 1)
        result[f"tokens_per_pass_{tag}"] = per_pass
        result[f"acceptance_{tag}"] = (per_pass - 1) / gamma
        if temperature == 0:
            alone = decode(target, prompts, desc="target alone", **common)
            result["target_tokens_per_s"] = alone.tokens / alone.seconds
            result["speculative_tokens_per_s"] = helped.tokens / helped.seconds
            result["speedup"] = result["speculative_tokens_per_s"] / result["target_tokens_per_s"]
            same = [a == b for a, b in zip(alone.outputs, helped.outputs, strict=True)]
            result["identical_outputs"] = sum(same) / len(same)
            by_itself = decode(draft, prompts, desc="draft alone", **common)
            result["draft_tokens_per_s"] = by_itself.tokens / by_itself.seconds
            # c_draft / c_target per token, and what the arithmetic below predicts from it
            result["cost_ratio"] = result["target_tokens_per_s"] / result["draft_tokens_per_s"]
            result["predicted_speedup"] = predicted_speedup(per_pass, gamma, result["cost_ratio"])
    return result


def predicted_speedup(tokens_per_pass: float, gamma: int, cost_ratio: float) -> float:
    """Speed-up over the target alone when one round — γ draft tokens at ``cost_ratio`` of a
    target token each, then one target pass over γ + 1 tokens, costed as one target token (the
    optimistic end: a memory-bound pass) — yields ``tokens_per_pass`` tokens."""
    return tokens_per_pass / (gamma * cost_ratio + 1)


def largest_cost_ratio(tokens_per_pass: float, gamma: int, speedup: float) -> float:
    """The draft's largest per-token cost, as a share of the target's, that still reaches
    ``speedup`` at ``tokens_per_pass`` (the inverse of :func:`predicted_speedup`; negative when
    no draft can)."""
    return (tokens_per_pass / speedup - 1) / gamma
