"""An OpenAI-compatible HTTP server for a local Hugging Face teacher.

    potstill serve bundled:smollm2-135m-instruct --port 8000
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``GET /health``. Responses follow the OpenAI API's shapes
(ids, ``created``, ``object``, ``usage``; completions-style and chat-style logprobs), so the
``openai`` client, vLLM-style tooling and potstill's own HTTP teacher backend can talk to it.

Requests are served one at a time: a lock around the batched ``HFBackend``, and all prompts and
``n`` samples of one request are decoded together in batches of ``batch_size`` rows.

Scoring given tokens (a teacher for training over HTTP): ``POST /v1/completions`` with
``echo: true`` and ``max_tokens: 0`` returns the log-probabilities of the prompt itself — the
prompt may be token ids (a list of ints, or a list of such lists), ``logprobs`` may be up to the
vocabulary size, ``temperature`` tempers the returned log-probabilities (nothing is sampled), and
``return_tokens_as_token_ids: true`` names tokens ``"token_id:N"`` (vLLM's convention), so ids
survive tokens that decode alike. As in the OpenAI API, position 0 has no log-probabilities.

What differs from the OpenAI API:
  * no streaming, tools, penalties, ``logit_bias``, ``suffix`` or ``best_of``, and ``echo`` only
    for scoring (``max_tokens: 0``): a request that asks for more gets a 400 that says so (other
    unknown fields are ignored);
  * no ``seed`` means a fresh random seed per request; with a seed, the same request gives the
    same completions (see ``potstill.generation.hf`` for the exact promise);
  * ``max_tokens`` defaults to 16 for completions (as OpenAI's) and to 512 for chat, capped by
    the model's context;
  * logprobs are the model's untempered log-probabilities; the completion tokens include the EOS
    token that ended a choice (its text does not).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.errors import GenerationError
from potstill.generation.base import Completion, Prompt, SamplingParams, api_key_from_env
from potstill.generation.hf import MAX_LOGPROBS, HFBackend

log = logging.getLogger("potstill.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # a CPU-friendly bound; ask for more with max_completion_tokens
MAX_N = 128  # samples per prompt in one request
MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is read


# ---------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    """Fields both endpoints share. Strict types: "2" is not a number, 1 is not a bool."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt (completions, with echo)
    stop: str | list[str] | None = None
    seed: int | None = None
    # Accepted only at their do-nothing values:
    stream: bool | None = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)  # ≤ MAX_LOGPROBS when sampling, ≤ V when scoring
    echo: bool | None = False
    return_tokens_as_token_ids: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]  # a string, or content parts: text parts only

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        for part in content if isinstance(content, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    "only text content parts {'type': 'text', 'text': '...'} are supported; "
                    f"got a part of type {part.get('type')!r}"
                )
        return content


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _unsupported(request: _Request) -> None:
    """Reject the OpenAI features this server does not implement, naming the field."""
    checks = [
        ("stream", bool(request.stream), "streaming is not supported; set stream=false"),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty must be 0"),
        ("frequency_penalty", bool(request.frequency_penalty), "frequency_penalty must be 0"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(request, CompletionRequest):
        checks += [
            (
                "echo",
                bool(request.echo) and request.max_tokens != 0,
                "echo is supported for scoring only: set max_tokens=0 (or echo=false)",
            ),
            ("suffix", request.suffix is not None, "suffix (insertion) is not supported"),
            ("best_of", request.best_of not in (None, request.n), "best_of must equal n"),
        ]
    if isinstance(request, ChatRequest):
        checks += [
            ("tools", bool(request.tools), "tools / function calling are not supported"),
            (
                "response_format",
                (request.response_format or {"type": "text"}).get("type") != "text",
                "only response_format {'type': 'text'} is supported",
            ),
        ]
    for param, bad, message in checks:
        if bad:
            raise _invalid(message, param)


# ---------------------------------------------------------------------------------------------
# Responses


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise _invalid("stop strings must be non-empty", "stop")
    return stops


def _usage(prompt_tokens: int, choices: list[Completion]) -> dict[str, int]:
    completion_tokens = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(c: Completion) -> dict[str, list]:
    """Completions-style logprobs. As in the OpenAI API, each top_logprobs dict also holds the
    sampled token, so it has up to logprobs + 1 entries; text_offset counts from the completion's
    first character."""
    offsets = _offsets(c.tokens)
    top = [
        {**t, token: lp} if token not in t else t
        for t, token, lp in zip(c.top_logprobs, c.tokens, c.token_logprobs, strict=True)
    ]
    return {
        "tokens": c.tokens,
        "token_logprobs": c.token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(c: Completion) -> dict[str, list]:
    """Chat-style logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = [
        {
            **_token_entry(token, lp),
            "top_logprobs": [_token_entry(t, tlp) for t, tlp in top.items()],
        }
        for token, lp, top in zip(c.tokens, c.token_logprobs, c.top_logprobs, strict=True)
    ]
    return {"content": content, "refusal": None}


# ---------------------------------------------------------------------------------------------
# The app


def create_app(
    backend: HFBackend,
    model_id: str,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """A FastAPI app serving ``backend`` under the model name ``model_id``; with ``api_key``,
    every endpoint but ``/health`` asks for ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="potstill serve", version="1")
    lock = threading.Lock()  # one request at a time through the batched backend: others queue
    started = int(time.time())
    context = getattr(getattr(backend.model, "config", None), "max_position_embeddings", None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        """The key (compared in constant time) and the body's size, before anything is read."""
        if expected is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected):
                body = error_body(
                    "a valid API key is required (Authorization: Bearer <key>)",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
                return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                message = "a request body needs a Content-Length"
                return JSONResponse(error_body(message, "invalid_request_error"), 411)
            if not length.isdigit() or int(length) > max_body_bytes:
                message = f"the request body is larger than {max_body_bytes:,} bytes"
                return JSONResponse(error_body(message, "invalid_request_error"), 413)
        return await call_next(request)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, err: RecursionError):
        message = "the request body is nested too deeply to be a request"
        return JSONResponse(error_body(message, "invalid_request_error"), 400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        return JSONResponse(error_body(err.message, kind, err.param, err.code), err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":  # its loc is a character position
            param, message = None, f"the request body is not valid JSON ({first.get('msg')})"
        elif param is None:
            message = f"the request body must be a JSON object ({first.get('msg')})"
        else:
            message = f"{param}: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 404:
            message += " (endpoints: /v1/models, /v1/completions, /v1/chat/completions)"
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind), err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)  # the traceback stays here
        message = f"internal server error ({type(err).__name__}); see the server log"
        return JSONResponse(error_body(message, "server_error"), 500)

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{model_id}` "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def prompt_lengths(prompts: list[Prompt]) -> list[int]:
        """Each prompt's token count; a prompt the backend cannot render is a 400."""
        try:
            return [len(backend.prompt_token_ids(p)) for p in prompts]
        except GenerationError as err:
            raise _invalid(str(err)) from None

    def sampling(
        request: _Request,
        max_tokens: tuple[str, int | None],
        default: int,
        longest_prompt: int,
        logprobs: int | None,
    ) -> SamplingParams:
        """The backend's parameters; ``max_tokens`` is (the field's name, its value). Without
        one, ``default`` lowered so the longest prompt still fits in the model's context."""
        param, max_new_tokens = max_tokens
        room = context - longest_prompt if context else None
        if max_new_tokens is None:
            max_new_tokens = max(1, min(default, room)) if room is not None else default
        elif room is not None and max_new_tokens > room:
            raise _invalid(
                f"{param}={max_new_tokens} does not fit: the longest prompt has {longest_prompt} "
                f"tokens and the model's context is {context}; ask for at most {max(room, 0)}",
                param,
            )
        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=max_new_tokens,
            stop=_stop(request.stop),
            seed=request.seed if request.seed is not None else secrets.randbits(63),
            logprobs=logprobs,
        )

    def run(prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """The backend's completions, with its errors mapped to HTTP errors."""
        try:
            return backend.generate(prompts, params)
        except GenerationError as err:
            raise _invalid(str(err)) from None
        except Exception as err:
            log.exception("generation failed")  # the traceback stays in the server log
            message = f"generation failed ({type(err).__name__}); see the server log"
            raise APIError(500, message) from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, started)]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> dict:
        check_model(name)
        return _model_card(model_id, started)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict:
        with lock:  # the tokenizer and the model serve one request at a time
            return _completions(request)

    def _completions(request: CompletionRequest) -> dict:
        check_model(request.model)
        _unsupported(request)
        if request.echo:
            return _score(request)
        if request.max_tokens == 0:
            raise _invalid("max_tokens=0 scores the prompt: set echo=true", "max_tokens")
        if request.logprobs is not None and request.logprobs > MAX_LOGPROBS:
            raise _invalid(f"logprobs must be ≤ {MAX_LOGPROBS} when sampling", "logprobs")
        if _token_ids(request.prompt) is not None:
            raise _invalid("token-id prompts are supported for scoring (echo, max_tokens=0)")
        prompts: list[Prompt] = (
            [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        )
        if not prompts:
            raise _invalid("prompt is an empty list; give at least one prompt", "prompt")
        lengths = prompt_lengths(prompts)
        params = sampling(
            request,
            ("max_tokens", request.max_tokens),
            COMPLETIONS_DEFAULT_MAX_TOKENS,
            max(lengths),
            request.logprobs,
        )
        results = run(prompts, params)
        choices = [c for per_prompt in results for c in per_prompt]  # index = prompt * n + sample
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": completion_logprobs(c) if params.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(sum(lengths), choices),
            "system_fingerprint": None,
        }

    def _score(request: CompletionRequest) -> dict:
        """The prompts' own log-probabilities (echo, max_tokens=0): top-``logprobs`` per
        position at ``temperature``."""
        tokenizer, model = backend.tokenizer, backend.model
        rows = _token_ids(request.prompt)
        if rows is None:
            texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        vocab = model.get_output_embeddings().weight.shape[0]
        k = request.logprobs or 0
        if k > vocab:
            raise _invalid(f"logprobs must be ≤ the vocabulary size {vocab}", "logprobs")
        if request.temperature <= 0:
            raise _invalid("scoring needs temperature > 0", "temperature")
        if any(not r for r in rows):
            raise _invalid("a prompt has no tokens", "prompt")
        if any(t < 0 or t >= vocab for r in rows for t in r):
            raise _invalid(f"token ids must be in [0, {vocab})", "prompt")
        if context and max(map(len, rows)) > context:
            raise _invalid(f"a prompt is longer than the model's context ({context})", "prompt")
        as_ids = bool(request.return_tokens_as_token_ids)
        name = (lambda i: f"token_id:{i}") if as_ids else (lambda i: tokenizer.decode([i]))
        choices = []
        for index, ids in enumerate(rows):
            try:
                logp = score_tokens(model, ids, request.temperature)  # (T-1, V)
            except Exception as err:
                log.exception("scoring failed")
                raise APIError(500, f"scoring failed ({type(err).__name__})") from None
            own = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()  # (T-1,)
            top_lp, top_ids = logp.topk(k, dim=-1) if k else (None, None)
            top = [None] + (
                [
                    dict(zip(map(name, i), lp, strict=True))
                    for i, lp in zip(top_ids.tolist(), top_lp.tolist(), strict=True)
                ]
                if k
                else [None] * (len(ids) - 1)
            )
            tokens = [name(i) for i in ids]
            choices.append(
                {
                    "index": index,
                    "text": "" if as_ids else "".join(tokens),
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": [None, *own],
                        "top_logprobs": top if request.logprobs is not None else None,
                        "text_offset": [0] * len(tokens) if as_ids else _offsets(tokens),
                    },
                    "finish_reason": "length",
                }
            )
        prompt_tokens = sum(map(len, rows))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 0,
                "total_tokens": prompt_tokens,
            },
            "system_fingerprint": None,
        }

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict:
        with lock:
            return _chat_completions(request)

    def _chat_completions(request: ChatRequest) -> dict:
        check_model(request.model)
        _unsupported(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise _invalid("top_logprobs needs logprobs=true", "top_logprobs")
        if request.max_tokens == 0:
            raise _invalid("max_tokens must be ≥ 1 for chat completions", "max_tokens")
        messages: list[dict] = [_message(m) for m in request.messages]
        [length] = prompt_lengths([messages])
        max_tokens = (
            ("max_completion_tokens", request.max_completion_tokens)
            if request.max_completion_tokens is not None
            else ("max_tokens", request.max_tokens)
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = sampling(request, max_tokens, CHAT_DEFAULT_MAX_TOKENS, length, logprobs)
        [choices] = run([messages], params)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(c) if logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(length, choices),
            "system_fingerprint": None,
        }

    return app


@torch.no_grad()
def score_tokens(model, ids: list[int], temperature: float) -> torch.Tensor:
    """log p(· | ids[:t+1]) at ``temperature`` for t < T−1: (T-1, V) fp32."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0, :-1]  # (T-1, V)
    return torch.log_softmax(logits.float() / temperature, dim=-1).cpu()


def _token_ids(prompt) -> list[list[int]] | None:
    """The prompt as rows of token ids, or None when it is text."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(r, list) for r in prompt):
        return prompt
    return None


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return offsets


def _union_tag(part) -> bool:
    """Pydantic puts the tried union member in an error's loc ("str", "list[dict[str, Any]]");
    those are not request fields."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "potstill"}


def _message(message: ChatMessage) -> dict:
    """A chat-template message: text parts joined by newlines (as vLLM does), and OpenAI's
    ``developer`` role written as ``system``, the role chat templates know."""
    content = message.content
    if not isinstance(content, str):
        content = "\n".join(part["text"] for part in content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "float32",
    batch_size: int = 16,
    api_key_env: str | None = None,
) -> None:
    """Load ``model`` (any name ``potstill.models.load_model`` accepts) and serve it over HTTP
    with the OpenAI API until interrupted. The model id clients pass is ``model`` itself; with
    ``api_key_env``, clients must send the key that environment variable holds."""
    import uvicorn

    api_key = None if api_key_env is None else api_key_from_env(api_key_env, "--api-key-env")
    backend = HFBackend(model, dtype=dtype, batch_size=batch_size)
    app = create_app(backend, model, api_key=api_key)
    url = f"http://{host}:{port}/v1"
    print(f"potstill serve: {model} ({dtype}, batch_size {batch_size}) at {url}")
    key = f"os.environ[{api_key_env!r}]" if api_key_env else '"unused"'
    print(f'  e.g. OpenAI(base_url="{url}", api_key={key}), model="{model}"')
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        backend.close()
