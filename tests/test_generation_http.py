"""The OpenAI-compatible HTTP backend against a fake server whose behaviour each test scripts:
routing, the request bodies, order and the concurrency bound, retries and their limits, error
messages, malformed answers, time-outs, and keeping the API key secret."""

import asyncio
import json
import logging
import random
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from potstill.errors import GenerationError
from potstill.generation.base import SamplingParams
from potstill.generation.openai_http import (
    OpenAIBackend,
    backoff_delay,
    error_message,
    map_finish_reason,
    parse_response,
    parse_retry_after,
    split_count,
)

SECRET = "sk-test-do-not-leak-0123456789"
FAST = {"backoff_base": 0.001, "backoff_max": 0.01}  # retries without waiting


# ---------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server in a background thread


@dataclass
class Request:
    number: int  # arrival order, from 1
    path: str
    body: dict
    authorization: str | None


@dataclass
class Reply:
    status: int = 200
    body: object = None  # JSON-encoded unless bytes
    headers: tuple = ()
    delay: float = 0.0  # seconds to sleep before answering


def echo_reply(request: Request) -> Reply:
    """A well-formed answer: each choice is `echo:<prompt>:<index>`; logprobs when asked."""
    body = request.body
    chat = request.path.endswith("/chat/completions")
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    choices = []
    for i in range(body.get("n", 1)):
        text = f"echo:{prompt}:{i}"
        choice = {"index": i, "finish_reason": "length" if body["max_tokens"] < 3 else "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if body.get("logprobs"):
            pieces = ["echo", ":", "x"]
            if chat:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": p,
                            "logprob": -0.5 * j,
                            "top_logprobs": [{"token": p, "logprob": -0.5 * j}],
                        }
                        for j, p in enumerate(pieces)
                    ]
                }
            else:
                choice["logprobs"] = {
                    "tokens": pieces,
                    "token_logprobs": [-0.5 * j for j in range(3)],
                    "top_logprobs": [{p: -0.5 * j} for j, p in enumerate(pieces)],
                }
        choices.append(choice)
    # Reversed on purpose: the client must put choices back in `index` order.
    return Reply(body={"choices": choices[::-1], "usage": {"completion_tokens": 10 * len(choices)}})


class FakeServer:
    """Records every request and answers with `self.handler(request) -> Reply`."""

    def __init__(self):
        self.requests: list[Request] = []
        self.handler = echo_reply
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake._lock:
                    request = Request(
                        len(fake.requests) + 1,
                        self.path,
                        json.loads(raw),
                        self.headers.get("Authorization"),
                    )
                    fake.requests.append(request)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    reply = fake.handler(request)
                    time.sleep(reply.delay)
                finally:
                    # Out of flight before the reply is written: a client that reads it may send
                    # its next request before this thread would get to run a later decrement.
                    with fake._lock:
                        fake.in_flight -= 1
                try:
                    payload = (
                        reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body)
                    )
                    payload = payload.encode() if isinstance(payload, str) else payload
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


@pytest.fixture
def make_backend(server):
    made = []

    def make(**kwargs):
        kwargs = {**FAST, **kwargs}
        backend = OpenAIBackend(kwargs.pop("base_url", server.url), "teacher-model", **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def fail_first(k: int, status: int, headers: tuple = ()):
    """A handler that answers `status` to the first k requests, then echoes."""

    def handler(request: Request) -> Reply:
        if request.number <= k:
            return Reply(status, {"error": {"message": f"busy ({request.number})"}}, headers)
        return echo_reply(request)

    return handler


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------------------------
# Routing and request bodies


def test_auto_routes_messages_to_chat_and_strings_to_completions(server, make_backend):
    out = make_backend().generate(["Once", CHAT], SamplingParams())
    assert sorted(server.paths()) == ["/v1/chat/completions", "/v1/completions"]
    assert out[0][0].text == "echo:Once:0"
    assert out[1][0].text == "echo:hi:0"
    chat_request = next(r for r in server.requests if r.path.endswith("chat/completions"))
    assert chat_request.body["messages"] == CHAT
    assert chat_request.body["model"] == "teacher-model"


def test_forced_chat_wraps_a_string_as_one_user_message(server, make_backend):
    make_backend(chat="chat").generate(["Once"], SamplingParams())
    assert server.paths() == ["/v1/chat/completions"]
    assert server.requests[0].body["messages"] == [{"role": "user", "content": "Once"}]


def test_forced_completions_refuses_messages_before_sending_anything(server, make_backend):
    with pytest.raises(GenerationError, match=r"prompt 1 is a list of chat messages.*chat: auto"):
        make_backend(chat="completions").generate(["fine", CHAT], SamplingParams())
    assert server.requests == []


def test_bad_constructor_arguments_name_the_fix():
    with pytest.raises(GenerationError, match="chat must be one of auto, chat, completions"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", chat="yes")
    with pytest.raises(GenerationError, match="concurrency must be at least 1"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(GenerationError, match=r"http\(s\) URL"):
        OpenAIBackend("localhost:8000/v1", "m")


def test_sampling_params_are_mapped(server, make_backend):
    params = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, max_new_tokens=17, stop=("\n",), seed=5
    )
    make_backend().generate(["a"], params)
    body = server.requests[0].body
    assert body == {
        "model": "teacher-model",
        "prompt": "a",
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 17,
        "stop": ["\n"],
        "seed": 5,
    }  # no logprobs fields unless asked for, no empty stop list


def test_logprobs_requested_and_read_in_both_styles(server, make_backend):
    out = make_backend().generate(["a", CHAT], SamplingParams(logprobs=3))
    bodies = {
        ("chat" if r.path.endswith("chat/completions") else "text"): r.body for r in server.requests
    }
    assert bodies["text"]["logprobs"] == 3
    assert bodies["chat"]["logprobs"] is True
    assert bodies["chat"]["top_logprobs"] == 3
    for (completion,) in out:
        assert completion.tokens == ["echo", ":", "x"]
        assert completion.token_logprobs == [0.0, -0.5, -1.0]
        assert completion.top_logprobs == [{"echo": 0.0}, {":": -0.5}, {"x": -1.0}]
        assert completion.num_tokens == 3  # counted from the logprobs, exact per choice


def test_choices_are_reordered_by_index_and_finish_reasons_mapped(server, make_backend):
    backend = make_backend()
    (choices,) = backend.generate(["p"], SamplingParams(n=3))
    assert [c.text for c in choices] == ["echo:p:0", "echo:p:1", "echo:p:2"]
    assert {c.finish_reason for c in choices} == {"stop"}
    assert sum(c.num_tokens for c in choices) == 30  # usage total, shared out
    (short,) = backend.generate(["p"], SamplingParams(max_new_tokens=2))
    assert short[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_results_keep_prompt_order_and_concurrency_is_bounded(server, make_backend):
    def slow_then_fast(request: Request) -> Reply:
        reply = echo_reply(request)
        reply.delay = 0.15 if request.body["prompt"] in ("p0", "p1") else random.uniform(0, 0.03)
        return reply

    server.handler = slow_then_fast
    prompts = [f"p{i}" for i in range(20)]
    out = make_backend(concurrency=3).generate(prompts, SamplingParams())
    assert [c[0].text for c in out] == [f"echo:p{i}:0" for i in range(20)]
    assert server.max_in_flight == 3
    assert len(server.requests) == 20


def test_generate_works_inside_a_running_event_loop(server, make_backend):
    backend = make_backend()

    async def main():
        return backend.generate(["x"], SamplingParams())

    assert asyncio.run(main())[0][0].text == "echo:x:0"


def test_empty_batch_sends_nothing(server, make_backend):
    assert make_backend().generate([], SamplingParams()) == []
    assert server.requests == []


# ---------------------------------------------------------------------------------------------
# Retries and failures


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_statuses_are_retried_then_succeed(server, make_backend, status):
    server.handler = fail_first(2, status)
    out = make_backend(max_retries=2).generate(["p"], SamplingParams())
    assert out[0][0].text == "echo:p:0"
    assert len(server.requests) == 3


def test_retries_exhausted_name_the_attempts(server, make_backend):
    server.handler = fail_first(100, 503)
    with pytest.raises(GenerationError) as caught:
        make_backend(max_retries=3).generate(["p"], SamplingParams())
    message = str(caught.value)
    assert "unreachable or refusing" in message
    assert "after 4 attempts" in message
    assert "HTTP 503: busy (4)" in message  # the last failure, with the server's words
    assert len(server.requests) == 4


def nobody_listens() -> str:
    """The URL of a loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_unreachable_server_is_retried_then_reported(make_backend):
    backend = make_backend(base_url=nobody_listens(), max_retries=2)
    with pytest.raises(GenerationError, match=r"unreachable.*after 3 attempts.*ConnectError"):
        backend.generate(["p"], SamplingParams())


def test_client_error_is_not_retried_and_quotes_the_server(server, make_backend):
    server.handler = lambda r: Reply(400, {"error": {"message": "max_tokens is too large: 99999"}})
    with pytest.raises(GenerationError, match=r"answered 400: max_tokens is too large: 99999"):
        make_backend().generate(["p"], SamplingParams())
    assert len(server.requests) == 1


def test_404_hints_at_base_url(server, make_backend):
    server.handler = lambda r: Reply(404, {"detail": "Not Found"})
    with pytest.raises(GenerationError, match=r"answered 404: Not Found \(check base_url"):
        make_backend().generate(["p"], SamplingParams())


def test_retry_after_is_honoured(server, make_backend):
    server.handler = fail_first(1, 429, headers=(("Retry-After", "0.3"),))
    start = time.perf_counter()
    make_backend(backoff_max=5.0).generate(["p"], SamplingParams())
    assert time.perf_counter() - start >= 0.3
    assert len(server.requests) == 2


def test_timeout_is_retried(server, make_backend):
    def first_one_hangs(request: Request) -> Reply:
        reply = echo_reply(request)
        reply.delay = 1.0 if request.number == 1 else 0.0
        return reply

    server.handler = first_one_hangs
    out = make_backend(timeout=0.25).generate(["p"], SamplingParams())
    assert out[0][0].text == "echo:p:0"
    assert len(server.requests) == 2


def test_timeouts_exhausted_say_so(server, make_backend):
    server.handler = lambda r: Reply(200, {"choices": []}, delay=0.6)
    with pytest.raises(GenerationError, match=r"after 2 attempts \(last: no answer within 0.2 s"):
        make_backend(timeout=0.2, max_retries=1).generate(["p"], SamplingParams())


def test_one_failed_prompt_fails_the_batch_quickly(server, make_backend):
    def one_bad(request: Request) -> Reply:
        if request.body["prompt"] == "bad":
            return Reply(400, {"error": {"message": "bad prompt"}})
        return Reply(**{**echo_reply(request).__dict__, "delay": 0.05})

    server.handler = one_bad
    prompts = ["bad"] + [f"p{i}" for i in range(40)]
    with pytest.raises(GenerationError, match="bad prompt"):
        make_backend(concurrency=2).generate(prompts, SamplingParams())
    time.sleep(0.2)
    assert len(server.requests) < 10  # the queued prompts were never sent


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>upstream crashed</html>", r"body is not JSON .*upstream crashed"),
        ({"id": "x"}, r"no `choices` list"),
        ({"choices": [{"index": 0, "text": "a"}]}, r"asked for n=2 .* returned 1 choices"),
        ({"choices": [{"index": 0}, {"index": 1}]}, r"choice 0 has no `text`"),
        ([1, 2], r"expected a JSON object, got a JSON list"),
        ({"error": "model overloaded"}, r"the server returned an error: model overloaded"),
    ],
)
def test_malformed_responses_say_what_is_missing(server, make_backend, body, match):
    server.handler = lambda r: Reply(200, body)
    backend = make_backend(max_retries=2)
    with pytest.raises(GenerationError, match=match):
        backend.generate(["p"], SamplingParams(n=2))
    if isinstance(body, bytes):  # not JSON: cut short on the way, or a proxy's page; retried
        assert len(server.requests) == 3 and backend.failures == {"malformed body": 3}
    else:  # JSON of the wrong shape: the same request gets the same answer; not retried
        assert len(server.requests) == 1


def test_closed_backend_refuses_politely(make_backend):
    backend = make_backend()
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(GenerationError, match="closed"):
        backend.generate(["p"], SamplingParams())


# ---------------------------------------------------------------------------------------------
# The API key


def _everything_printed(err: BaseException) -> str:
    """str, repr and the full traceback (with any chained exceptions) of an error."""
    return str(err) + repr(err) + "".join(traceback.format_exception(err))


def _chain(err: BaseException) -> list[BaseException]:
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def test_api_key_is_sent_but_never_shown(server, make_backend, monkeypatch, caplog):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    backend = make_backend(api_key_env="TEACHER_KEY", max_retries=1, timeout=0.3)
    backend.generate(["p"], SamplingParams())
    assert server.requests[0].authorization == f"Bearer {SECRET}"
    assert SECRET not in repr(backend) + str(backend) + repr(vars(backend))
    assert "TEACHER_KEY" in repr(backend)

    failures = [
        fail_first(100, 503),  # retries exhausted
        lambda r: Reply(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}),
        lambda r: Reply(200, f"oops {SECRET}".encode()),  # non-JSON echoing the key
        lambda r: Reply(200, {"choices": []}, delay=0.8),  # time-outs
    ]
    for handler in failures:
        server.handler = handler
        with pytest.raises(GenerationError) as caught:
            backend.generate(["p"], SamplingParams())
        assert SECRET not in _everything_printed(caught.value)
        assert not any("httpx" in type(e).__module__ for e in _chain(caught.value))
    assert SECRET not in caplog.text
    assert "retry 1/1" in caplog.text  # retries are logged, without the key


def test_a_server_echoing_the_key_gets_it_redacted(server, make_backend, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    server.handler = lambda r: Reply(401, {"error": {"message": f"bad key: {SECRET}"}})
    with pytest.raises(GenerationError, match=r"answered 401: bad key: \*\*\* \(check the API key"):
        make_backend(api_key_env="TEACHER_KEY").generate(["p"], SamplingParams())


def test_unreachable_with_a_key_does_not_leak_it(make_backend, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    backend = make_backend(base_url=nobody_listens(), api_key_env="TEACHER_KEY")
    with pytest.raises(GenerationError) as caught:
        backend.generate(["p"], SamplingParams())
    assert SECRET not in _everything_printed(caught.value)


def test_missing_api_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("TEACHER_KEY", raising=False)
    with pytest.raises(
        GenerationError, match=r"\$TEACHER_KEY, which is not set.*export TEACHER_KEY"
    ):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env="TEACHER_KEY")


def test_no_key_sends_no_authorization(server, make_backend):
    make_backend().generate(["p"], SamplingParams())
    assert server.requests[0].authorization is None


# ---------------------------------------------------------------------------------------------
# The pure helpers


def test_backoff_grows_is_capped_and_jittered():
    rng = random.Random(0)
    delays = [backoff_delay(r, base=1.0, cap=5.0, rng=rng) for r in range(6)]
    for retry, delay in enumerate(delays):
        ceiling = min(5.0, 2.0**retry)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(0, base=1.0, cap=5.0, retry_after=3.0) == 3.0
    assert backoff_delay(0, base=1.0, cap=5.0, retry_after=120.0) == 5.0  # capped


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = "Wed, 21 Oct 2015 07:28:10 GMT"
    now = 1445412480.0  # 07:28:00 that day
    assert parse_retry_after(date, now=now) == pytest.approx(10.0)


def test_split_count_adds_up():
    assert split_count(10, [1, 1]) == [5, 5]
    assert split_count(10, [3, 1]) in ([8, 2], [7, 3])  # 7.5 / 2.5: one of them rounds up
    assert sum(split_count(7, [1, 1, 1])) == 7
    assert split_count(5, [0, 0]) in ([3, 2], [2, 3])
    assert split_count(0, [4, 2]) == [0, 0]


def test_finish_reasons_and_error_messages():
    assert map_finish_reason("length") == "length"
    for other in ("stop", "eos", None, "content_filter", "tool_calls"):
        assert map_finish_reason(other) == "stop"
    assert error_message({"error": {"message": "m1"}}) == "m1"
    assert error_message({"object": "error", "message": "m2"}) == "m2"
    assert error_message({"detail": "m3"}) == "m3"


def test_usage_is_the_token_count_for_one_choice():
    data = {
        "choices": [{"text": "abc", "finish_reason": "stop"}],
        "usage": {"completion_tokens": 4},
    }
    assert parse_response(data, n=1, chat=False)[0].num_tokens == 4
    data.pop("usage")
    assert parse_response(data, n=1, chat=False)[0].num_tokens == 0  # nothing to count from
