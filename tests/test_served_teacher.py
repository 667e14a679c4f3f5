"""A teacher served over HTTP (`potstill serve` on loopback) scores each batch's tokens:
the client's top-k equals the model's own, and token-level and on-policy runs train against it
with no teacher model in the training process."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from potstill.cli import main
from potstill.data import collate, tokenize_records
from potstill.errors import GenerationError
from potstill.generation.hf import HFBackend
from potstill.generation.openai_http import OpenAIBackend
from potstill.serve import create_app
from potstill.teachers.server import ServedTeacher
from potstill.teachers.writer import CaptureSettings, top_k_rows

RECORDS = [{"prompt": f"{a}*{b}=", "completion": f" {a * b}"} for a in range(2, 9) for b in (3, 4)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_chat_lm, tiny_pair_dirs):
    """(folder, base_url): the saved tiny teacher served under its folder's name, the student,
    data and a recipe."""
    import uvicorn

    root = tmp_path_factory.mktemp("served")
    model, tokenizer = tiny_chat_lm
    for name in ("teacher", "student"):
        (root / name).symlink_to(tiny_pair_dirs / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(HFBackend(model, tokenizer, batch_size=4), str(root / "teacher"))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    (root / "r.yaml").write_text(
        f"method: token_level\nteacher: {{model: {root / 'teacher'}, source: server, "
        f"server_url: '{url}'}}\nstudent: {{model: {root / 'student'}, init: pretrained}}\n"
        f"data: {{train: {root / 'data.jsonl'}, max_length: 32, max_eval_records: 2}}\n"
        "cache: {top_k: 5}\n"
        "train: {max_steps: 2, batch_size: 3, precision: fp32, save_every: 0, log_every: 1}\n"
    )
    yield root, url
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_served_top_k_is_the_models_own(served, tiny_chat_lm):
    root, url = served
    model, tokenizer = tiny_chat_lm
    teacher = ServedTeacher(OpenAIBackend(url, str(root / "teacher")), top_k=5, temperature=2.0)
    examples, _ = tokenize_records(RECORDS[:3], tokenizer, max_length=32)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)  # right-padded rows
    mask = batch["labels"] != -100
    ids, logprobs = teacher.rows(batch, mask)
    settings = CaptureSettings(top_k=5, temperature=2.0)
    ref_ids, ref_lp = top_k_rows(model, batch, vocab_size=len(tokenizer), settings=settings)
    assert ids.shape == (int(mask.sum()), 5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprobs, ref_lp, rtol=0, atol=2e-5)


def test_a_server_that_gives_fewer_entries_or_none_is_an_error(served):
    root, url = served
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3).long()}
    mask = torch.tensor([[True, True, False]])
    too_many = ServedTeacher(OpenAIBackend(url, str(root / "teacher")), top_k=500, temperature=1)
    with pytest.raises(GenerationError, match="answered 400: logprobs must be ≤ the vocabulary"):
        too_many.rows(batch, mask)
    capped = ServedTeacher(OpenAIBackend(url, "m"), top_k=4, temperature=1)  # a server capped at 3
    with pytest.raises(GenerationError, match=r"returned 3 log-probabilities.*--max-logprobs"):
        capped._entries({"token_id:1": -1.0, "token_id:2": -2.0, "token_id:3": -3.0}, 0, 1)
    with pytest.raises(GenerationError, match="by their text"):
        capped._entries({"a": -1.0, "b": -2.0, "c": -3.0, "d": -4.0}, 0, 1)
    down = OpenAIBackend("http://127.0.0.1:9/v1", "m", max_retries=0)  # nothing listens there
    with pytest.raises(GenerationError, match="unreachable"):
        ServedTeacher(down, top_k=5, temperature=1).rows(batch, mask)


@pytest.mark.parametrize("method", ["token_level", "on_policy"])
def test_training_against_a_served_teacher_loads_no_teacher(served, method, monkeypatch):
    import potstill.prepare as prepare

    root, _ = served
    loaded = []
    real = prepare.load_model
    monkeypatch.setattr(
        prepare, "load_model", lambda name, **kw: loaded.append(name) or real(name, **kw)
    )
    out = root / f"run_{method}"
    extra = ["on_policy.max_new_tokens=4", "on_policy.eval_samples=false"]
    args = ["train", str(root / "r.yaml"), f"method={method}", f"train.output_dir={out}"]
    assert main(args + (extra if method == "on_policy" else [])) == 0
    assert loaded == [str(root / "student")]  # never the teacher
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["soft"] > 0 and rows[-1]["eval/teacher_kl_topk"] > 0
    if method == "on_policy":
        assert rows[0]["on_policy_fraction"] == 1.0 and rows[0]["own_reverse_kl"] > 0


def test_a_cache_written_from_the_server_equals_one_written_in_process(served):
    from potstill.teachers.cache import CacheReader, iter_rows, read_manifest

    root, _ = served
    recipe = str(root / "r.yaml")
    assert main(["cache", recipe, f"teacher.cache={root / 'c_server'}"]) == 0  # source: server
    assert main(["cache", recipe, "teacher.source=live", f"teacher.cache={root / 'c_live'}"]) == 0
    served_manifest = read_manifest(root / "c_server")
    assert served_manifest["teacher"]["server_url"].startswith("http://127.0.0.1")
    assert served_manifest["teacher"]["weights_sha256"] is None
    for split in ("train", "eval"):
        a = list(iter_rows(CacheReader(root / "c_server", split)))
        b = list(iter_rows(CacheReader(root / "c_live", split)))
        assert [x[0] for x in a] == [x[0] for x in b] and len(a) > 0
        for (_, ids_a, lp_a), (_, ids_b, lp_b) in zip(a, b, strict=True):
            assert torch.equal(ids_a, ids_b)
            torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=2e-3)  # float16 storage


def test_check_probes_the_server(served, capsys):
    root, _ = served
    assert main(["check", str(root / "r.yaml")]) == 0
    assert "serves" in capsys.readouterr().out
    assert main(["check", str(root / "r.yaml"), "teacher.server_url=http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/v1 does not answer" in err and "Traceback" not in err
