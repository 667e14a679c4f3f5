"""One interface for every teacher that writes text: a local Hugging Face model, an
OpenAI-compatible HTTP server, or vLLM's offline engine.

A prompt is either a plain string (completion style: the backend continues it verbatim) or a list
of chat messages (the backend applies the model's own chat template, or calls a chat endpoint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from potstill.errors import GenerationError

Prompt = str | list[dict]  # "Once upon a time" | [{"role": "user", "content": "..."}]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # the completion is cut before the first stop string
    seed: int = 0  # same seed, prompts and backend -> same completions
    logprobs: int | None = None  # also return each sampled token's logprob and this many top ones


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    num_tokens: int  # completion tokens generated (as the backend counts them)
    # Only when SamplingParams.logprobs is set (per generated token, in order):
    tokens: list[str] | None = None
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = field(default=None)


class Backend(Protocol):
    teacher_id: str  # written into every generated record

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order."""
        ...

    def close(self) -> None: ...


def api_key_from_env(name: str, who: str) -> str:
    """The API key the environment variable ``name`` holds; ``who`` (e.g. "the recipe") names
    what asked for it in the error a missing or empty variable gets."""
    value = os.environ.get(name, "")
    if not value:
        raise GenerationError(
            f"{who} reads the API key from ${name}, which is not set: `export {name}=...` first"
        )
    return value
