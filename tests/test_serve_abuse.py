"""`potstill serve` under load and abuse, on the loopback and bounded in count and time: many
concurrent clients queue rather than fail (latency percentiles printed; `-s` shows them), every
abusive request gets a 4xx — never a 500, never a hang — and with an API key nothing but /health
answers without it."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from potstill.generation.hf import HFBackend
from potstill.serve import create_app

pytest.importorskip("uvicorn")
from _served import serving

MODEL = "tiny-test"
KEY = "s3cret-key-for-tests"
CLIENTS, REQUESTS_EACH = 8, 6


@pytest.fixture(scope="module")
def backend(tiny_chat_lm):
    return HFBackend(*tiny_chat_lm, batch_size=4)


@pytest.fixture(scope="module")
def url(backend):
    with serving(create_app(backend, MODEL, max_body_bytes=64 * 1024)) as u:
        yield u


@pytest.fixture(scope="module")
def keyed_url(backend):
    with serving(create_app(backend, MODEL, api_key=KEY)) as u:
        yield u


def test_concurrent_clients_queue_and_all_succeed(url):
    def client(i: int) -> list[float]:
        took = []
        with httpx.Client(timeout=60) as http:
            for j in range(REQUESTS_EACH):
                started = time.perf_counter()
                r = http.post(
                    f"{url}/completions",
                    json={"model": MODEL, "prompt": f"client {i} asks {j}", "max_tokens": 4,
                          "seed": i * 100 + j},
                )  # fmt: skip
                assert r.status_code == 200, r.text
                assert len(r.json()["choices"]) == 1
                took.append(time.perf_counter() - started)
        return took

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(t for ts in pool.map(client, range(CLIENTS)) for t in ts)
    assert len(latencies) == CLIENTS * REQUESTS_EACH

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    print(
        f"\n{len(latencies)} requests from {CLIENTS} concurrent clients, all 200: latency p50 "
        f"{pct(0.5):.0f} ms, p90 {pct(0.9):.0f} ms, p99 {pct(0.99):.0f} ms"
    )


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny-test", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


ABUSE = [  # (name, how to send it, the status it must get)
    ("oversized body", lambda h, u: h.post(f"{u}/completions", content=b"x" * (65 * 1024),
     headers={"content-type": "application/json"}), 413),
    ("no content-length", lambda h, u: h.post(f"{u}/completions", content=iter([b"{}"]),
     headers={"content-type": "application/json"}), 411),
    ("deeply nested JSON", lambda h, u: h.post(f"{u}/completions", content=_nested(20_000),
     headers={"content-type": "application/json"}), 400),
    ("absurd max_tokens", lambda h, u: h.post(f"{u}/completions", json={"model": MODEL,
     "prompt": "a", "max_tokens": 10**12}), 400),
    ("absurd n", lambda h, u: h.post(f"{u}/completions", json={"model": MODEL, "prompt": "a",
     "n": 10**9}), 400),
    ("absurd logprobs", lambda h, u: h.post(f"{u}/completions", json={"model": MODEL,
     "prompt": "a", "logprobs": 10**9}), 400),
    ("negative token id", lambda h, u: h.post(f"{u}/completions", json={"model": MODEL,
     "prompt": [5, -3], "echo": True, "max_tokens": 0}), 400),
    ("token id beyond the vocabulary", lambda h, u: h.post(f"{u}/completions", json={
     "model": MODEL, "prompt": [5, 10**9], "echo": True, "max_tokens": 0}), 400),
    ("a huge integer", lambda h, u: h.post(f"{u}/completions", content=b'{"model": "tiny-test",'
     b' "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",
     headers={"content-type": "application/json"}), 400),
    ("not JSON", lambda h, u: h.post(f"{u}/completions", content=b"\xff\xfe{",
     headers={"content-type": "application/json"}), 400),
    ("a JSON list", lambda h, u: h.post(f"{u}/chat/completions", json=[1, 2]), 400),
    ("wrong types", lambda h, u: h.post(f"{u}/chat/completions", json={"model": MODEL,
     "messages": "hi", "temperature": "hot"}), 400),
    ("another model", lambda h, u: h.post(f"{u}/completions", json={"model": "gpt-9",
     "prompt": "a"}), 404),
    ("unknown path", lambda h, u: h.get(f"{u}/../admin"), 404),
    ("wrong method", lambda h, u: h.delete(f"{u}/models"), 405),
]  # fmt: skip


@pytest.mark.parametrize(("name", "send", "status"), ABUSE, ids=[a[0] for a in ABUSE])
def test_abuse_gets_a_4xx_never_a_500_or_a_hang(url, name, send, status):
    with httpx.Client(timeout=20) as http:
        started = time.perf_counter()
        r = send(http, url)
        assert time.perf_counter() - started < 20
        assert r.status_code == status, r.text[:500]
        body = r.json()
        assert body["error"]["message"] and "Traceback" not in r.text
        # and the server still serves
        ok = http.post(f"{url}/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200


def test_an_api_key_guards_every_endpoint_but_health(keyed_url):
    root = keyed_url.removesuffix("/v1")
    good = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=20) as http:
        assert http.get(f"{root}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for r in (
                http.get(f"{keyed_url}/models", headers=headers),
                http.post(
                    f"{keyed_url}/completions",
                    json={"model": MODEL, "prompt": "a", "max_tokens": 2},
                    headers=headers,
                ),
            ):
                assert r.status_code == 401 and KEY not in r.text
                assert r.json()["error"]["code"] == "invalid_api_key"
        r = http.post(
            f"{keyed_url}/completions",
            json={"model": MODEL, "prompt": "a", "max_tokens": 2},
            headers=good,
        )
        assert r.status_code == 200 and json.loads(r.text)["choices"]
        assert http.get(f"{keyed_url}/models", headers=good).status_code == 200


def test_serve_binds_the_loopback_by_default():
    import inspect

    from potstill.cli import parse
    from potstill.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert parse(["serve", "some/model"]).host == "127.0.0.1"


def test_a_run_against_a_keyed_teacher_writes_the_key_nowhere(
    tiny_chat_lm, tiny_pair_dirs, tmp_path, monkeypatch, capsys
):
    """Training against a served teacher that needs a key: the key travels in the header only —
    not in the run folder (recipe, metrics, logs, checkpoints, model), its report card, the
    files of a generation from the same server, nor in what is printed — and a wrong key is one
    line that does not show it either."""
    from potstill.cli import main

    teacher = str(tiny_pair_dirs / "teacher")
    rows = [{"prompt": f"{a}*{b}=", "completion": f" {a * b}"} for a in range(2, 9) for b in (3, 4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serving(create_app(HFBackend(*tiny_chat_lm, batch_size=4), teacher, api_key=KEY)) as u:
        (tmp_path / "r.yaml").write_text(
            f"method: token_level\nteacher: {{model: {teacher}, source: server, "
            f"server_url: '{u}', api_key_env: POTSTILL_TEST_KEY}}\n"
            f"student: {{model: {tiny_pair_dirs / 'student'}, init: pretrained}}\n"
            f"data: {{train: {tmp_path / 'd.jsonl'}, max_length: 32, max_eval_records: 2}}\n"
            "train: {max_steps: 2, batch_size: 3, precision: fp32, save_every: 1, log_every: 1}\n"
        )
        out = tmp_path / "run"
        monkeypatch.setenv("POTSTILL_TEST_KEY", KEY)
        assert main(["train", str(tmp_path / "r.yaml"), f"train.output_dir={out}"]) == 0
        generate = [
            "generate", str(tmp_path / "r.yaml"), "method=sequence_level", "teacher.source=live",
            f"generate.prompts={tmp_path / 'd.jsonl'}", "generate.max_prompts=4",
            "generate.backend=openai", f"generate.base_url={u}", f"generate.model={teacher}",
            "generate.api_key_env=POTSTILL_TEST_KEY", "generate.max_new_tokens=4",
            f"generate.output={tmp_path / 'gen' / 'g.jsonl'}",
        ]  # fmt: skip
        assert main(generate) == 0
        assert len((tmp_path / "gen" / "g.jsonl").read_text().splitlines()) == 4
        monkeypatch.setenv("POTSTILL_TEST_KEY", KEY + "-wrong")
        code = main(["train", str(tmp_path / "r.yaml"), f"train.output_dir={tmp_path / 'no'}"])
    card = tmp_path / "card" / "report.html"  # the report card of the run, beside it
    assert main(["report", str(out), "--no-generation", "--no-speed", "-o", str(card)]) == 0
    printed = capsys.readouterr()
    assert code == 2 and "401" in printed.err and not (tmp_path / "no").exists()
    folders = (out, card.parent, tmp_path / "gen")
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 5 and (out / "recipe.yaml").is_file() and card.is_file()
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked and KEY not in printed.out + printed.err
