"""potstill serve over loopback, driven by the official `openai` client: the model list,
completions and chat completions (with logprobs) agree with the backend, and every bad request
gets an OpenAI-style error body with the right status and no traceback."""

import httpx
import pytest
import torch

from potstill.generation.base import SamplingParams
from potstill.generation.hf import HFBackend
from potstill.serve import create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from _served import serving  # noqa: E402 - after the importorskip

MODEL = "tiny-test"
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def backend(tiny_chat_lm):
    return HFBackend(*tiny_chat_lm, batch_size=4)


@pytest.fixture(scope="module")
def base_url(backend):
    """The server's /v1 URL: uvicorn in a background thread on a free loopback port."""
    with serving(create_app(backend, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client):
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "potstill")
    assert client.models.retrieve(MODEL).id == MODEL


def test_completions_match_the_backend(client, backend):
    response = client.completions.create(
        model=MODEL, prompt=["abc", "Hello"], n=2, temperature=0.8, max_tokens=6, seed=5,
        logprobs=2, stop="\n",
    )  # fmt: skip
    params = SamplingParams(
        n=2, temperature=0.8, max_new_tokens=6, seed=5, logprobs=2, stop=("\n",)
    )
    expected = [c for per_prompt in backend.generate(["abc", "Hello"], params) for c in per_prompt]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL and isinstance(response.created, int)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI orders
    for choice, c in zip(response.choices, expected, strict=True):
        assert (choice.text, choice.finish_reason) == (c.text, c.finish_reason)
        lp = choice.logprobs
        assert lp.tokens == c.tokens and lp.token_logprobs == pytest.approx(c.token_logprobs)
        for top, want, token in zip(lp.top_logprobs, c.top_logprobs, c.tokens, strict=True):
            assert top == pytest.approx({**want, token: top[token]})  # the sampled one is added
        assert lp.text_offset == [sum(len(t) for t in c.tokens[:i]) for i in range(len(c.tokens))]
    prompt_tokens = len(backend.prompt_token_ids("abc")) + len(backend.prompt_token_ids("Hello"))
    assert response.usage.prompt_tokens == prompt_tokens == 8
    assert response.usage.completion_tokens == sum(c.num_tokens for c in expected)
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_chat_completions_with_logprobs(client, backend):
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, temperature=1.0, top_p=0.9, max_completion_tokens=7,
        seed=11, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=7, seed=11, logprobs=3)
    [expected] = backend.generate([CHAT], params)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert len(response.choices) == 3
    for i, (choice, c) in enumerate(zip(response.choices, expected, strict=True)):
        assert choice.index == i and choice.message.role == "assistant"
        assert (choice.message.content, choice.finish_reason) == (c.text, c.finish_reason)
        content = choice.logprobs.content
        assert [e.token for e in content] == c.tokens
        assert [e.logprob for e in content] == pytest.approx(c.token_logprobs)
        for entry, top in zip(content, c.top_logprobs, strict=True):
            assert entry.bytes == list(entry.token.encode())
            assert [(t.token, t.logprob) for t in entry.top_logprobs] == list(top.items())
    assert response.usage.prompt_tokens == len(backend.prompt_token_ids(CHAT))
    assert response.usage.completion_tokens == sum(c.num_tokens for c in expected)


def test_seeded_requests_repeat_and_defaults_work(client):
    ask = dict(model=MODEL, messages=CHAT, max_tokens=5, seed=3)  # max_tokens: the older name
    first, again = (client.chat.completions.create(**ask) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].logprobs is None
    assert first.usage.completion_tokens <= 5
    plain = client.completions.create(model=MODEL, prompt="abc")  # max_tokens defaults to 16
    assert plain.usage.completion_tokens <= 16 and plain.choices[0].logprobs is None


def test_text_parts_are_joined_and_developer_is_system(client, backend):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    rendered = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\n2+2?"},
    ]
    assert response.usage.prompt_tokens == len(backend.prompt_token_ids(rendered))


# --- errors ------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["message"] and "Traceback" not in response.text and 'File "' not in response.text
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("chat/completions", {"model": MODEL}, 400, "messages"),
        ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "n": 0}, 400, "n"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "n": "2"}, 400, "n"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "temperature"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "top_p"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "stream": True}, 400, "stream"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "stop": [""]}, 400, "stop"),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
        ("chat/completions", {"messages": CHAT}, 400, "model"),
        ("chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404, "model"),
        ("completions", {"model": MODEL, "prompt": ["a", 3]}, 400, None),
        ("completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
        ("completions", {"model": MODEL, "prompt": ""}, 400, None),
        ("completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
        ("completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
        ("no/such/endpoint", {}, 404, None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_error_bodies(base_url, path, body, status, param):
    error = assert_error(httpx.post(f"{base_url}/{path}", json=body), status, param)
    if status == 404 and param == "model":
        assert error["code"] == "model_not_found" and MODEL in error["message"]


def test_malformed_json_and_the_openai_client_see_errors(base_url, client):
    bad_json = httpx.post(
        f"{base_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    error = assert_error(bad_json, 400)
    assert "not valid JSON" in error["message"] and error["param"] is None
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=0)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"


def test_internal_errors_are_500_without_a_traceback(base_url, backend, monkeypatch):
    def broken(prompts, params):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(backend, "generate", broken)
    response = httpx.post(f"{base_url}/completions", json={"model": MODEL, "prompt": "a"})
    error = assert_error(response, 500)
    assert "RuntimeError" in error["message"] and "secret internals" not in response.text


def test_potstill_http_backend_against_potstill_serve(base_url, backend):
    # The two ends potstill ships, over loopback: a teacher served on one machine feeds
    # `potstill generate` (backend openai) on another, and both ends agree with the local backend.
    from potstill.generation.openai_http import OpenAIBackend

    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=6, seed=11, logprobs=2)
    prompts = [CHAT, "Hello", [{"role": "user", "content": "Name a colour."}]]
    with OpenAIBackend(base_url, MODEL, concurrency=2, max_retries=0) as remote:
        got = remote.generate(prompts, params)
    want = backend.generate(prompts, params)
    for remote_samples, local_samples in zip(got, want, strict=True):
        assert [c.text for c in remote_samples] == [c.text for c in local_samples]
        assert [c.finish_reason for c in remote_samples] == [c.finish_reason for c in local_samples]
        for r, lo in zip(remote_samples, local_samples, strict=True):
            assert r.token_logprobs == pytest.approx(lo.token_logprobs, abs=1e-5)


def test_scoring_token_ids_returns_the_models_top_k(base_url, backend):
    """echo + max_tokens=0 scores given tokens: top-k per position at a temperature, by id."""
    model = backend.model
    rows = [[5, 30, 31, 40, 7], [60, 61]]
    body = {
        "model": MODEL, "prompt": rows, "echo": True, "max_tokens": 0, "logprobs": 7,
        "temperature": 2.0, "return_tokens_as_token_ids": True,
    }  # fmt: skip
    data = httpx.post(f"{base_url}/completions", json=body, timeout=30).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for ids, choice in zip(rows, data["choices"], strict=True):
        lp = choice["logprobs"]
        assert lp["tokens"] == [f"token_id:{i}" for i in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()  # (T-1, V)
        ref = torch.log_softmax(logits / 2.0, -1)
        top, top_ids = ref.topk(7, -1)
        for t in range(len(ids) - 1):
            got = lp["top_logprobs"][t + 1]
            assert list(got) == [f"token_id:{i}" for i in top_ids[t].tolist()]
            assert list(got.values()) == pytest.approx(top[t].tolist(), abs=1e-5)
            assert lp["token_logprobs"][t + 1] == pytest.approx(float(ref[t, ids[t + 1]]), abs=1e-5)
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 2], "echo": True, "max_tokens": 3}, "echo"),
        ({"prompt": [1, 2], "echo": True, "max_tokens": 0, "logprobs": 10_000}, "logprobs"),
        ({"prompt": [1, 100_000], "echo": True, "max_tokens": 0}, "prompt"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": [1, 2], "max_tokens": 2}, None),
    ],
)
def test_bad_scoring_requests_name_the_field(base_url, body, param):
    response = httpx.post(f"{base_url}/completions", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
