"""A teacher served over HTTP: any OpenAI-compatible server that returns a prompt's own
log-probabilities with token ids (``potstill serve``; vLLM with ``return_tokens_as_token_ids``)
scores each batch's tokens, and training uses its top-k at every supervised position — the same
sparse loss as a teacher cache, so no teacher model is in the training process.

One HTTP client serves it (:class:`potstill.generation.openai_http.OpenAIBackend`: bounded
concurrency, retries with back-off and ``Retry-After``, one clear error when the server stays
unreachable). vLLM caps ``logprobs`` at 20 unless started with a larger ``--max-logprobs``; a
server that returns fewer entries than asked is refused with that said.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from potstill.errors import GenerationError
from potstill.generation.openai_http import OpenAIBackend

PREFIX = "token_id:"


class ServedTeacher:
    """``rows(batch, mask)`` -> the server's top-k ``(ids (N, k), log-probs (N, k))`` at the
    batch's supervised positions, in the order of ``mask`` (row-major)."""

    def __init__(self, backend: OpenAIBackend, *, top_k: int, temperature: float):
        self.backend, self.top_k, self.temperature = backend, top_k, temperature

    def __repr__(self) -> str:
        return f"ServedTeacher({self.backend.base_url}, model={self.backend.model!r})"

    def rows(self, batch: dict[str, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded rows
        tokens = [batch["input_ids"][b, :n].tolist() for b, n in enumerate(lengths)]
        answers = self.backend.score(tokens, top_logprobs=self.top_k, temperature=self.temperature)
        ids, logprobs = [], []
        for b, answer in enumerate(answers):
            top = answer["top_logprobs"]  # position i: p(token i | tokens < i); 0 has none
            for t in mask[b].nonzero().squeeze(1).tolist():  # supervised: predicts token t+1
                i, lp = self._entries(top[t + 1], b, t + 1)
                ids.append(i)
                logprobs.append(lp)
        device = mask.device
        if not ids:
            empty = torch.zeros(0, self.top_k)
            return empty.long().to(device), empty.to(device)
        return torch.tensor(ids, device=device), torch.tensor(logprobs, device=device)

    def _entries(self, top: dict[str, float] | None, row: int, position: int):
        """The k most likely ``(ids, log-probs)`` of one position's ``{token_id:N: lp}``."""
        if not isinstance(top, dict) or len(top) < self.top_k:
            got = len(top) if isinstance(top, dict) else 0
            raise GenerationError(
                f"{self.backend.base_url} returned {got} log-probabilities at row {row}, position "
                f"{position}, fewer than cache.top_k={self.top_k}: lower cache.top_k, or raise the "
                "server's cap (vLLM: --max-logprobs; its default is 20)"
            )
        if not all(key.startswith(PREFIX) for key in top):
            raise GenerationError(
                f"{self.backend.base_url} named tokens by their text, not their ids; the teacher "
                "server must honour return_tokens_as_token_ids (potstill serve, vLLM do)"
            )
        best = sorted(top.items(), key=lambda kv: -kv[1])[: self.top_k]
        return [int(key[len(PREFIX) :]) for key, _ in best], [float(v) for _, v in best]


def served_teacher(teacher: Any, top_k: int, temperature: float) -> ServedTeacher:
    """The recipe's served teacher (``teacher`` is the recipe's TeacherSpec)."""
    backend = OpenAIBackend(
        teacher.server_url,
        teacher.model,
        api_key_env=teacher.api_key_env,
        concurrency=teacher.server_concurrency,
        timeout=teacher.server_timeout,
    )
    return ServedTeacher(backend, top_k=top_k, temperature=temperature)
