"""A teacher behind any OpenAI-compatible HTTP server: ``vllm serve``, SGLang, llama.cpp's
``llama-server``, TGI, ``potstill serve``, or OpenAI itself.

backend = OpenAIBackend("http://localhost:8000/v1", "Qwen/Qwen3-8B", concurrency=16)
completions = backend.generate(prompts, SamplingParams(n=4, temperature=0.8))

How it talks to the server:
  * one POST per prompt; chat messages go to ``/chat/completions`` and plain strings to
    ``/completions`` (``chat="auto"``), or everything to one of them (``chat="chat"`` /
    ``chat="completions"``). ``base_url`` is the API root, usually ending in ``/v1``;
  * at most ``concurrency`` requests in flight, from a pool of threads sharing one
    ``httpx.Client``. Threads, not asyncio, so ``generate`` works from plain code and from code
    that already runs an event loop (a notebook, a web server);
  * 429, 408, 5xx, refused connections and time-outs are retried with exponential back-off and
    jitter (a ``Retry-After`` header is honoured, capped at ``backoff_max``); any other 4xx fails
    at once, quoting the server. After ``max_retries`` retries ``generate`` raises
    ``GenerationError``; the caller decides what to keep (the ``potstill generate`` runner has
    already written the earlier batches and resumes from there);
  * the API key is read once, from the environment variable the recipe names, and only ever
    sent as ``Authorization: Bearer ...``: it is kept out of ``repr``, log lines and error
    messages (a server that echoes it back gets it replaced by ``***``).

``Completion.num_tokens``: the number of logprob entries when logprobs were asked for (exact per
choice); otherwise the server's ``usage.completion_tokens`` (exact for ``n=1``; for ``n>1`` the
total is shared out in proportion to each choice's text length); 0 when the server reports
neither.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx

from potstill.errors import GenerationError
from potstill.generation.base import Completion, Prompt, SamplingParams, api_key_from_env

log = logging.getLogger(__name__)

CHAT_MODES = ("auto", "chat", "completions")
RETRY_STATUSES = frozenset({408, 429})  # plus every 5xx: the server may answer next time
ERROR_TEXT_CHARS = 500  # how much of a server's error body goes into our message


# ---------------------------------------------------------------------------------------------
# Request bodies (pure)


def completions_body(model: str, prompt: str, params: SamplingParams) -> dict[str, Any]:
    """The JSON body for ``POST /completions``."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, **_sampling_fields(params)}
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs  # legacy style: an int, the number of top tokens
    return body


def chat_body(model: str, messages: list[dict], params: SamplingParams) -> dict[str, Any]:
    """The JSON body for ``POST /chat/completions``."""
    body: dict[str, Any] = {"model": model, "messages": messages, **_sampling_fields(params)}
    if params.logprobs is not None:
        body["logprobs"] = True  # chat style: a flag, plus the number of top tokens
        body["top_logprobs"] = params.logprobs
    return body


def _sampling_fields(params: SamplingParams) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
    }
    if params.stop:
        fields["stop"] = list(params.stop)
    return fields


# ---------------------------------------------------------------------------------------------
# Responses (pure)


def parse_response(data: Any, *, n: int, chat: bool) -> list[Completion]:
    """``n`` completions from a decoded response body; ``GenerationError`` naming what is
    missing when the body is not the shape an OpenAI-compatible server returns."""
    if not isinstance(data, dict):
        raise GenerationError(f"malformed response: expected a JSON object, got {_shape(data)}")
    choices = data.get("choices")
    if not isinstance(choices, list):
        if "error" in data:  # some servers answer errors with status 200
            raise GenerationError(f"the server returned an error: {error_message(data)}")
        raise GenerationError("malformed response: no `choices` list in the body")
    if len(choices) != n:
        raise GenerationError(
            f"malformed response: asked for n={n} completions per prompt, the server returned "
            f"{len(choices)} choices (if it does not support `n`, use n: 1)"
        )
    if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])

    texts = [_choice_text(c, chat=chat, position=i) for i, c in enumerate(choices)]
    try:
        logprobs = [_choice_logprobs(c) for c in choices]
    except (KeyError, TypeError, ValueError) as err:
        raise GenerationError(f"malformed response: unreadable `logprobs` ({err!r})") from None
    usage = data.get("usage")
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    shares = split_count(total, [len(t) for t in texts]) if isinstance(total, int) else [0] * n

    completions = []
    for text, choice, lp, share in zip(texts, choices, logprobs, shares, strict=True):
        tokens, token_logprobs, top = lp if lp is not None else (None, None, None)
        completions.append(
            Completion(
                text=text,
                finish_reason=map_finish_reason(choice.get("finish_reason")),
                num_tokens=len(tokens) if tokens is not None else share,
                tokens=tokens,
                token_logprobs=token_logprobs,
                top_logprobs=top,
            )
        )
    return completions


def _choice_text(choice: Any, *, chat: bool, position: int) -> str:
    if not isinstance(choice, dict):
        raise GenerationError(f"malformed response: choice {position} is {_shape(choice)}")
    if chat:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise GenerationError(f"malformed response: choice {position} has no `message`")
        return message.get("content") or ""  # None when the model only called a tool
    text = choice.get("text")
    if not isinstance(text, str):
        raise GenerationError(f"malformed response: choice {position} has no `text` string")
    return text


def _choice_logprobs(choice: dict) -> tuple[list[str], list[float], list[dict[str, float]]] | None:
    """(tokens, their logprobs, top logprobs per position) from either response style, or None."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):  # chat: [{"token", "logprob", "top_logprobs": [...]}]
        entries = lp["content"]
        tokens = [e["token"] for e in entries]
        token_logprobs = [float(e["logprob"]) for e in entries]
        top = [
            {t["token"]: float(t["logprob"]) for t in e.get("top_logprobs") or []} for e in entries
        ]
        return tokens, token_logprobs, top
    if isinstance(lp.get("tokens"), list):  # completions: parallel lists
        tokens = lp["tokens"]
        # The first token of a prompt-echo can have a null logprob; sampled tokens never do.
        token_logprobs = [float(x) if x is not None else float("nan") for x in lp["token_logprobs"]]
        top = [{k: float(v) for k, v in (t or {}).items()} for t in lp.get("top_logprobs") or []]
        return tokens, token_logprobs, top or [{} for _ in tokens]
    return None


def map_finish_reason(reason: Any) -> str:
    """``"length"`` when the token budget ran out; ``"stop"`` for everything else (EOS, a stop
    string, a tool call, a content filter, or a server that reports nothing)."""
    return "length" if reason in ("length", "max_tokens") else "stop"


def split_count(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` shared out in proportion to ``weights`` (equally when they are all 0), as
    integers that add up to ``total`` (largest remainders get the spare units)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def error_message(data: Any) -> str:
    """The human message inside an error body: OpenAI's ``{"error": {"message"}}``, vLLM's
    ``{"message"}``, FastAPI's ``{"detail"}``; else the body itself."""
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str | list) and data[key]:
                return str(data[key])
    return json.dumps(data)[:ERROR_TEXT_CHARS]


def _shape(value: Any) -> str:
    return f"a JSON {type(value).__name__}" if value is not None else "null"


# ---------------------------------------------------------------------------------------------
# Retries (pure)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(
    retry: int, *, base: float, cap: float, retry_after: float | None = None, rng=random
) -> float:
    """Seconds to wait before retry number ``retry`` (0 = the first retry).

    The server's ``Retry-After`` wins when it gives one (capped at ``cap``); otherwise
    ``base * 2**retry`` capped at ``cap``, with "equal jitter" (half fixed, half random) so that
    many clients refused at once do not come back at once.
    """
    if retry_after is not None:
        return min(retry_after, cap)
    ceiling = min(cap, base * 2**retry)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# ---------------------------------------------------------------------------------------------
# The backend


class _Secret:
    """A string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an API key is never pickled; read it from the environment again")


class _Cancelled(Exception):
    """Another prompt of the same batch failed; this one stops quietly."""


class OpenAIBackend:
    """An OpenAI-compatible server as a teacher. See the module docstring for the protocol."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        chat: str = "auto",  # "auto": messages -> /chat/completions, strings -> /completions
        concurrency: int = 8,  # requests in flight; servers batch them, so more is faster
        max_retries: int = 5,  # retries per request after the first attempt
        timeout: float = 60.0,  # seconds per network operation; a long generation needs more
        teacher_id: str | None = None,  # written into every record; defaults to `model`
        backoff_base: float = 0.5,  # first retry waits ~0.5 s, then 1, 2, 4, ... (jittered)
        backoff_max: float = 30.0,  # the longest wait between two attempts, Retry-After included
    ):
        if chat not in CHAT_MODES:
            raise GenerationError(f"chat must be one of {', '.join(CHAT_MODES)}; got {chat!r}")
        for name, value, low in (
            ("concurrency", concurrency, 1),
            ("max_retries", max_retries, 0),
            ("backoff_base", backoff_base, 0),
            ("backoff_max", backoff_max, 0),
        ):
            if value < low:
                raise GenerationError(f"{name} must be at least {low}; got {value}")
        if timeout <= 0:
            raise GenerationError(f"timeout must be a positive number of seconds; got {timeout}")
        url = httpx.URL(base_url.rstrip("/") + "/")
        if url.scheme not in ("http", "https") or not url.host:
            raise GenerationError(
                f"base_url must be an http(s) URL such as http://localhost:8000/v1; got {url}"
            )

        headers = {"User-Agent": "potstill"}
        self._api_key: _Secret | None = None
        if api_key_env is not None:
            value = api_key_from_env(api_key_env, "the recipe")
            self._api_key = _Secret(value)
            headers["Authorization"] = f"Bearer {value}"

        self.base_url = str(url.copy_with(username=None, password=None)).rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.chat = chat
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.teacher_id = teacher_id or model
        # what the retries cost: failed attempts by kind, and seconds spent backing off
        self.failures: dict[str, int] = {}
        self.waited_s = 0.0
        self._stats_lock = threading.Lock()
        self._client: httpx.Client | None = httpx.Client(
            base_url=url,
            headers=headers,  # httpx prints an Authorization header as [secure]
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def __repr__(self) -> str:
        key = f", api_key_env={self.api_key_env!r}" if self.api_key_env else ""
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, chat={self.chat!r}, "
            f"concurrency={self.concurrency}{key})"
        )

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; safe to call twice."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- generate ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order.

        Raises ``GenerationError`` as soon as one prompt fails for good; the other requests of
        the batch stop (those already on the wire finish in the background and are dropped).
        """
        if self._client is None:
            raise GenerationError("this OpenAIBackend is closed; create a new one")
        requests = [self._route(i, prompt, params) for i, prompt in enumerate(prompts)]
        return self._in_parallel(
            [(self._complete, path, body, params.n) for path, body in requests]
        )

    def score(
        self, rows: Sequence[Sequence[int]], *, top_logprobs: int, temperature: float = 1.0
    ) -> list[dict[str, Any]]:
        """The server's log-probabilities of each row of token ids itself (``echo`` with
        ``max_tokens: 0``, tokens named ``token_id:N``): each row's completions-style
        ``logprobs`` object, in row order. Raises ``GenerationError`` as :meth:`generate` does."""
        if self._client is None:
            raise GenerationError("this OpenAIBackend is closed; create a new one")
        bodies = [
            {
                "model": self.model,
                "prompt": list(row),
                "echo": True,
                "max_tokens": 0,
                "logprobs": top_logprobs,
                "temperature": temperature,
                "return_tokens_as_token_ids": True,
            }
            for row in rows
        ]
        return self._in_parallel([(self._prompt_logprobs, body) for body in bodies])

    def _prompt_logprobs(self, body: dict, stop: threading.Event) -> dict[str, Any]:
        url = f"{self.base_url}/completions"
        data = self._post("completions", body, stop)
        try:
            logprobs = data["choices"][0]["logprobs"]
            if not isinstance(logprobs.get("top_logprobs"), list):
                raise TypeError("no top_logprobs list")
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise GenerationError(
                f"{url} did not return prompt log-probabilities ({err}); the server must "
                "support echo with max_tokens=0 and logprobs (potstill serve does)"
            ) from None
        return logprobs

    def _in_parallel(self, jobs: list[tuple]) -> list[Any]:
        """``fn(*args, stop)`` for every ``(fn, *args)`` job, ``concurrency`` at a time, results
        in job order; the first job that fails for good stops the others and is raised."""
        if not jobs:
            return []
        stop = threading.Event()  # set when one job has failed: the others give up
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="potstill-http"
        )
        try:
            futures = [pool.submit(fn, *args, stop) for fn, *args in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
            for error in errors:  # the first real failure, in prompt order
                if not isinstance(error, _Cancelled):
                    raise error
            if errors:
                raise GenerationError("the backend was closed while generating; nothing returned")
            return [future.result() for future in futures]
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _route(self, index: int, prompt: Prompt, params: SamplingParams) -> tuple[str, dict]:
        """(endpoint path, body) for one prompt, or a GenerationError before anything is sent."""
        if isinstance(prompt, str):
            if self.chat == "chat":
                return "chat/completions", chat_body(
                    self.model, [{"role": "user", "content": prompt}], params
                )
            return "completions", completions_body(self.model, prompt, params)
        if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            if self.chat == "completions":
                raise GenerationError(
                    f"prompt {index} is a list of chat messages, but chat: completions sends "
                    "plain text to /completions; use chat: auto (or chat: chat)"
                )
            return "chat/completions", chat_body(self.model, prompt, params)
        raise GenerationError(
            f"prompt {index} must be a string or a list of {{'role', 'content'}} messages; "
            f"got {type(prompt).__name__}"
        )

    def _complete(self, path: str, body: dict, n: int, stop: threading.Event) -> list[Completion]:
        data = self._post(path, body, stop)
        try:
            return parse_response(data, n=n, chat=path == "chat/completions")
        except GenerationError as err:
            raise GenerationError(f"{self.base_url}/{path}: {self._redact(str(err))}") from None

    def _post(self, path: str, body: dict, stop: threading.Event) -> Any:
        """The decoded JSON answer to one request, retrying what may succeed next time."""
        url = f"{self.base_url}/{path}"
        attempts = self.max_retries + 1
        last_failure = ""
        for attempt in range(attempts):
            if stop.is_set():
                raise _Cancelled
            client = self._client
            if client is None:
                raise _Cancelled  # closed while this batch was still running
            retry_after, fatal = None, False
            try:
                response = client.post(path, json=body)
            # Only the exception's class and text travel on: it also holds the request, headers
            # and all, so our error is raised outside the `except` and never chains to it.
            except httpx.TimeoutException as err:
                last_failure = f"no answer within {self.timeout:g} s ({type(err).__name__})"
                self._failed("timeout")
            except httpx.TransportError as err:
                last_failure = f"{type(err).__name__}: {err}"
                self._failed(type(err).__name__)
            except httpx.RequestError as err:  # e.g. a body that cannot be decoded: not transient
                last_failure, fatal = f"{type(err).__name__}: {err}", True
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return response.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):  # cut short, a proxy's page
                        kind = response.headers.get("content-type", "no content-type")
                        start = self._redact(response.text[:200])
                        last_failure = (
                            f"malformed response: status {status} but the body is not JSON "
                            f"({kind}): {start!r}"
                        )
                        self._failed("malformed body")
                else:
                    message = self._redact(_response_error_text(response))
                    if status not in RETRY_STATUSES and status < 500:
                        raise GenerationError(f"{url} answered {status}: {message}{_hint(status)}")
                    last_failure = f"HTTP {status}: {message}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    self._failed(f"HTTP {status}")
            if fatal:
                raise GenerationError(f"{url}: request failed: {last_failure}")

            if attempt + 1 < attempts:
                delay = backoff_delay(
                    attempt, base=self.backoff_base, cap=self.backoff_max, retry_after=retry_after
                )
                self._waited(delay)
                log.warning(
                    "%s: %s; retry %d/%d in %.2f s",
                    url,
                    last_failure,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if stop.wait(delay):
                    raise _Cancelled
        if last_failure.startswith("malformed"):
            raise GenerationError(
                f"{url} gave a {last_failure.removeprefix('malformed response: ')} "
                f"({attempts} attempt{'s' if attempts > 1 else ''}): is base_url an "
                "OpenAI-compatible API?"
            )
        raise GenerationError(
            f"the server at {self.base_url} is unreachable or refusing requests: gave up on "
            f"{path} after {attempts} attempts (last: {last_failure}). Check that it is up and "
            "not overloaded (lower concurrency, or raise max_retries / timeout)"
        )

    def _failed(self, kind: str) -> None:
        """Tally one failed attempt by kind."""
        with self._stats_lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1

    def _waited(self, seconds: float) -> None:
        with self._stats_lock:
            self.waited_s += seconds

    def _redact(self, text: str) -> str:
        if self._api_key is not None:
            text = text.replace(self._api_key.reveal(), "***")
        return text


def _response_error_text(response: httpx.Response) -> str:
    try:
        return error_message(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:ERROR_TEXT_CHARS] or response.reason_phrase


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check the API key and api_key_env)"
    if status == 404:
        return " (check base_url: it usually ends in /v1 — and the model name)"
    return ""
