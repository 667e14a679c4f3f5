"""A faulty API teacher: a local OpenAI-compatible server (loopback only) that answers at random
with 429 + Retry-After, 500, 503, a time-out, a body cut short, a body that is not JSON, or a slow
trickle — and ``potstill generate`` still finishes with every prompt answered exactly once.

The figures (requests, failures by kind, seconds backing off) are printed; run with ``-s`` to see
them. ``docs/reliability.md`` quotes them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from potstill.errors import GenerationError
from potstill.generate import ledger_path, run_generate
from potstill.generation.openai_http import OpenAIBackend
from potstill.recipe import load_recipe

PROMPTS = 400
TIMEOUT = 0.5  # the client's seconds per network operation; a "timeout" fault sleeps past it
FAULTS = {  # kind -> probability per request; the rest are answered well
    "429": 0.06,
    "500": 0.06,
    "503": 0.06,
    "timeout": 0.03,
    "truncated": 0.06,
    "malformed": 0.06,
    "trickle": 0.06,
}


def echo(path: str, raw: bytes) -> bytes:
    """/v1/completions like a model that echoes its prompt."""
    body = json.loads(raw)
    choice = {"index": 0, "text": f"echo:{body['prompt']}", "finish_reason": "stop"}
    return json.dumps({"choices": [choice], "usage": {"completion_tokens": 3}}).encode()


def forward_to(upstream: str) -> Callable[[str, bytes], bytes]:
    """A proxy's answer: the request relayed to a real server (e.g. potstill serve)."""
    client = httpx.Client(timeout=60)
    root = upstream.removesuffix("/v1")

    def answer(path: str, raw: bytes) -> bytes:
        r = client.post(root + path, content=raw, headers={"content-type": "application/json"})
        r.raise_for_status()
        return r.content

    return answer


class FaultyServer:
    """Answers POSTs with ``answer(path, body)``, or with a seeded fault instead."""

    def __init__(
        self,
        seed: int = 0,
        faults: dict[str, float] = FAULTS,
        down_after: int = 0,
        answer: Callable[[str, bytes], bytes] = echo,
    ):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so a cut body is a broken connection

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    draw, fault = fake.rng.random(), "ok"
                    for kind, p in faults.items():
                        if draw < p:
                            fault = kind
                            break
                        draw -= p
                    if down_after and sum(fake.served.values()) >= down_after:
                        fault = "503"  # down for good
                    fake.served[fault] += 1
                good = answer(self.path, raw) if fault not in ("429", "500", "503") else b""
                try:
                    if fault in ("429", "500", "503"):
                        extra = {"Retry-After": "0"} if fault == "429" else {}
                        self._send(int(fault), b'{"error": {"message": "try later"}}', extra)
                    elif fault == "timeout":
                        time.sleep(TIMEOUT * 2)
                        self._send(200, good)
                    elif fault == "truncated":  # promise the whole body, send half, hang up
                        self._send(200, good[: len(good) // 2], length=len(good))
                        self.close_connection = True
                    elif fault == "malformed":
                        self._send(200, good[:-7])
                    elif fault == "trickle":  # the whole body, in slow pieces
                        self._send(200, good, pieces=4, pause=TIMEOUT / 5)
                    else:
                        self._send(200, good)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this one

            def _send(self, status, payload, headers=None, length=None, pieces=1, pause=0.0):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length or len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                step = -(-len(payload) // pieces)
                for i in range(0, len(payload), step):
                    self.wfile.write(payload[i : i + step])
                    self.wfile.flush()
                    time.sleep(pause)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty():
    server = FaultyServer()
    yield server
    server.stop()


def test_generate_through_a_faulty_teacher_loses_and_duplicates_nothing(faulty, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"question {i}", "completion": "?"}) + "\n"
            for i in range(PROMPTS)
        )
    )
    out = tmp_path / "gen" / "completions.jsonl"
    recipe = load_recipe(
        None,
        [
            "method=sequence_level",
            "student.model=unused",
            f"generate.prompts={prompts}",
            f"generate.output={out}",
            "generate.backend=openai",
            f"generate.base_url={faulty.url}",
            "generate.model=teacher",
            "generate.batch_size=40",
            "generate.verify=none",
        ],
    )
    backend = OpenAIBackend(
        faulty.url, "teacher", concurrency=8, max_retries=12, timeout=TIMEOUT,
        backoff_base=0.01, backoff_max=0.2,
    )  # fmt: skip
    started = time.perf_counter()
    with backend:
        report = run_generate(recipe, backend=backend, progress=False)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ledger = [json.loads(line) for line in ledger_path(out).read_text().splitlines()]
    requests = sum(faulty.served.values())
    print(
        f"\n{requests} requests in {seconds:.1f} s; served: {dict(faulty.served)}; client saw "
        f"{dict(backend.failures)}, backed off {backend.waited_s:.1f} s"
    )
    assert requests >= 500 and set(faulty.served) == {"ok", *FAULTS}
    assert report.prompts == PROMPTS and len(ledger) == PROMPTS
    texts = [r["messages"][-1]["content"] if "messages" in r else r["completion"] for r in records]
    prompts_seen = [r["prompt"] for r in records]
    assert len(records) == PROMPTS and len(set(prompts_seen)) == PROMPTS  # none lost or doubled
    assert all(t == f"echo:{p}" for t, p in zip(texts, prompts_seen, strict=True))
    assert sum(backend.failures.values()) == requests - PROMPTS  # every failure was retried
    assert backend.failures.get("timeout", 0) >= faulty.served["timeout"]


def test_a_teacher_that_never_recovers_stops_with_the_work_kept(tmp_path):
    """All-failing after a while: the run stops with one message, and the prompts finished so
    far are kept for the next run to resume from."""
    server = FaultyServer(faults={}, down_after=20)
    try:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(
            "".join(json.dumps({"prompt": f"q{i}", "completion": "?"}) + "\n" for i in range(60))
        )
        out = tmp_path / "c.jsonl"
        recipe = load_recipe(
            None,
            [
                "method=sequence_level", "student.model=unused", f"generate.prompts={prompts}",
                f"generate.output={out}", "generate.backend=openai",
                f"generate.base_url={server.url}", "generate.model=teacher",
                "generate.batch_size=10", "generate.verify=none",
            ],
        )  # fmt: skip
        backend = OpenAIBackend(server.url, "teacher", concurrency=2, max_retries=2,
                                timeout=TIMEOUT, backoff_base=0.01, backoff_max=0.05)  # fmt: skip
        with backend, pytest.raises(GenerationError, match="re-run the same command to resume"):
            run_generate(recipe, backend=backend, progress=False)
        kept = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
        assert kept == [f"q{i}" for i in range(20)]  # the two whole batches before it went down
    finally:
        server.stop()


def test_training_against_a_faulty_served_teacher_equals_training_against_a_sound_one(
    tiny_chat_lm, tiny_pair_dirs, tmp_path
):
    """teacher.source=server through a proxy that injects the same faults in front of a real
    `potstill serve`: every batch is scored in the end, so the student equals the one trained
    against the server directly, bit for bit."""
    from _served import serving
    from safetensors.torch import load_file

    from potstill.cli import main
    from potstill.generation.hf import HFBackend
    from potstill.serve import create_app

    teacher = str(tiny_pair_dirs / "teacher")
    rows = [{"prompt": f"{a}*{b}=", "completion": f" {a * b}"} for a in range(2, 9) for b in (3, 4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train(url: str, out: str) -> dict:
        (tmp_path / "r.yaml").write_text(
            f"method: token_level\nteacher: {{model: {teacher}, source: server, "
            f"server_url: '{url}', server_timeout: {TIMEOUT}}}\n"
            f"student: {{model: {tiny_pair_dirs / 'student'}, init: pretrained}}\n"
            f"data: {{train: {tmp_path / 'd.jsonl'}, max_length: 32, max_eval_records: 2}}\n"
            "cache: {top_k: 5}\n"
            "train: {max_steps: 6, batch_size: 2, precision: fp32, save_every: 0, eval_every: 0}\n"
        )
        assert main(["train", str(tmp_path / "r.yaml"), f"train.output_dir={tmp_path / out}"]) == 0
        return load_file(tmp_path / out / "model" / "model.safetensors")

    with serving(create_app(HFBackend(*tiny_chat_lm, batch_size=4), teacher)) as upstream:
        sound = train(upstream, "sound")
        proxy = FaultyServer(seed=3, answer=forward_to(upstream))
        try:
            faulty = train(proxy.url, "faulty")
        finally:
            proxy.stop()
    print(f"\nserved teacher through the faulty proxy: {dict(proxy.served)}")
    assert sum(proxy.served.values()) > proxy.served["ok"] > 0  # some faults were served
    assert sound.keys() == faulty.keys()
    assert all(torch.equal(sound[k], faulty[k]) for k in sound)
