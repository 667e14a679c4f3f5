"""The teacher cache: format round trip, resume after a kill during writing, every manifest
mismatch and corruption path, and training from a cache with no teacher loaded."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from potstill.cli import main
from potstill.data import collate, tokenize_records
from potstill.errors import DataError, RecipeError
from potstill.teachers.cache import CacheError, CacheReader, iter_rows, read_manifest
from potstill.teachers.writer import CaptureSettings, top_k_rows, write_split

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(12) for b in (3, 7)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_pair_dirs):
    """The saved tiny teacher and student, data, and a recipe reading them."""
    root = tmp_path_factory.mktemp("cache")
    for name in ("teacher", "student"):
        (root / name).symlink_to(tiny_pair_dirs / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:20]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[20:]))
    (root / "r.yaml").write_text(
        f"method: token_level\nteacher: {{model: {root / 'teacher'}, cache: {root / 'c'}}}\n"
        f"student: {{model: {root / 'student'}, init: pretrained}}\n"
        f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_length: 32}}\n"
        "cache: {top_k: 4, shard_positions: 20, batch_size: 3}\n"
        "train: {max_steps: 3, batch_size: 4, precision: fp32, save_every: 0, log_every: 1}\n"
    )
    return root


def cache_bytes(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.glob("*.safetensors"))
    }


def test_round_trip_returns_what_the_teacher_says(tmp_path, tiny_chat_lm):
    model, tokenizer = tiny_chat_lm
    examples, _ = tokenize_records(RECORDS, tokenizer, max_length=32)
    settings = CaptureSettings(top_k=5, shard_positions=15, batch_size=4)
    score = functools.partial(top_k_rows, model, vocab_size=len(tokenizer), settings=settings)
    shards = write_split(
        score, examples, tmp_path, "train", pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), settings=settings,
    )  # fmt: skip
    assert len(shards) > 2 and shards[-1]["end"] == len(examples)
    manifest = {"splits": {"train": {"shards": shards}}}
    reader = CacheReader(tmp_path, "train", manifest)
    assert reader._shard(0)["ids"].dtype == torch.uint16  # a 100-token vocabulary: 2-byte ids
    batch = collate(examples[5:9], pad_token_id=tokenizer.pad_token_id)
    ids, logprobs = top_k_rows(model, batch, vocab_size=len(tokenizer), settings=settings)
    counts = (batch["labels"] != -100).sum(1).tolist()
    got_ids, got_lp = reader.rows([5, 6, 7, 8], counts)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_lp, logprobs.half().float())
    # the descending top-k of a log-softmax: every row sums to at most 1
    assert (logprobs.exp().sum(-1) <= 1 + 1e-5).all() and (logprobs.diff(dim=-1) <= 0).all()
    assert sum(1 for _ in iter_rows(reader)) == len(examples)
    with pytest.raises(CacheError, match="supervised positions"):
        reader.rows([5], [counts[0] + 1])


def test_a_coverage_rule_keeps_the_fewest_entries_reaching_the_mass(tmp_path, tiny_chat_lm):
    """Ragged shards: each position keeps the shortest prefix of its top-k whose mass reaches the
    coverage; read back, rows are padded with absent entries (−inf, the row's first id)."""
    _, tokenizer = tiny_chat_lm
    examples, _ = tokenize_records(RECORDS, tokenizer, max_length=32)
    settings = CaptureSettings(top_k=12, coverage=0.6, shard_positions=15, batch_size=4)

    def score(batch):  # a teacher peaked at some positions and flat at others, by its tokens
        mask = batch["labels"] != -100
        scale = 0.5 + batch["input_ids"][mask].float() % 7  # (P,)
        g = torch.Generator().manual_seed(int(batch["input_ids"].sum()))
        logits = torch.randn(int(mask.sum()), 100, generator=g) * scale[:, None]  # (P, V)
        top, ids = torch.log_softmax(logits, -1).topk(12, -1)
        return ids, top

    shards = write_split(
        score, examples, tmp_path, "train", pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), settings=settings,
    )  # fmt: skip
    manifest = {"coverage": 0.6, "splits": {"train": {"shards": shards}}}
    reader = CacheReader(tmp_path, "train", manifest)
    assert reader._shard(0)["counts"].dtype == torch.uint8
    batch = collate(examples[4:8], pad_token_id=tokenizer.pad_token_id)  # the writer's 2nd batch
    ids, logprobs = score(batch)
    stored = logprobs.half().float()  # (P, 12) what the writer kept before cutting
    mass = stored.exp().cumsum(-1)
    got_ids, got_lp = reader.rows([4, 5, 6, 7], (batch["labels"] != -100).sum(1).tolist())
    present = got_lp > float("-inf")  # (P, width)
    k = present.sum(-1)  # (P,) entries kept per position
    assert (k >= 1).all() and (k < k.max()).any() and k.max() == got_lp.shape[1]
    rows = torch.arange(k.numel())
    reached = mass[rows, k - 1] >= 0.6
    assert (reached | (k == 12)).all()  # reaches the coverage (or keeps all 12) ...
    assert ((k == 1) | (mass[rows, (k - 2).clamp(min=0)] < 0.6)).all()  # ... with the fewest
    assert torch.equal(got_ids[present], ids[:, : got_lp.shape[1]][present])
    torch.testing.assert_close(got_lp[present], stored[:, : got_lp.shape[1]][present])
    assert (got_ids == got_ids[:, :1]).logical_or(present).all()  # padding repeats the first id
    assert sum(s["entries"] for s in shards) < 12 * sum(s["positions"] for s in shards)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 training reads it
        again = reader.rows([4, 5, 6, 7], (batch["labels"] != -100).sum(1).tolist())
    assert torch.equal(again[1], got_lp)
    assert sum(1 for _ in iter_rows(reader)) == len(examples)


def test_tail_samples_come_from_outside_the_kept_entries_and_repeat_on_a_rerun(
    tmp_path, tiny_chat_lm
):
    model, tokenizer = tiny_chat_lm
    examples, _ = tokenize_records(RECORDS, tokenizer, max_length=32)
    settings = CaptureSettings(top_k=4, tail_samples=6, shard_positions=15, batch_size=4)
    score = functools.partial(top_k_rows, model, vocab_size=len(tokenizer), settings=settings)
    shards = write_split(
        score, examples, tmp_path, "train", pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), settings=settings,
    )  # fmt: skip
    reader = CacheReader(
        tmp_path, "train", {"tail_samples": 6, "splits": {"train": {"shards": shards}}}
    )
    batch = collate(examples[4:8], pad_token_id=tokenizer.pad_token_id)
    ids, _, draws, entropy = score(batch)
    again = score(batch)  # seeded by the batch's tokens: a resumed writer draws the same
    assert torch.equal(draws, again[2]) and draws.shape == (ids.shape[0], 6)
    assert not (draws[:, :, None] == ids[:, None, :]).any()  # never one of the top-4
    # a near-uniform 100-token teacher: the tail's entropy is close to log(96)
    assert (
        (entropy > 0.9 * torch.log(torch.tensor(96.0)))
        & (entropy <= torch.log(torch.tensor(96.0)) + 1e-4)
    ).all()
    got_draws, got_entropy = reader.tail([4, 5, 6, 7], (batch["labels"] != -100).sum(1).tolist())
    assert torch.equal(got_draws, draws)
    torch.testing.assert_close(got_entropy, entropy.half().float())


def test_a_coverage_cache_trains_and_costs_fewer_bytes(folder, tmp_path):
    fixed, out = tmp_path / "fixed", tmp_path / "c"
    argv = [str(folder / "r.yaml"), "cache.top_k=8"]
    assert main(["cache", *argv, f"teacher.cache={fixed}"]) == 0
    argv.append(f"teacher.cache={out}")
    assert main(["cache", *argv, "cache.coverage=0.05"]) == 0  # the tiny teacher is near-flat
    manifest = read_manifest(out)
    assert manifest["coverage"] == 0.05 and manifest["version"] == 2
    entries = [s["entries"] for split in manifest["splits"].values() for s in split["shards"]]
    positions = sum(split["positions"] for split in manifest["splits"].values())
    assert positions <= sum(entries) < 8 * positions
    assert manifest["bytes_per_position"] < read_manifest(fixed)["bytes_per_position"]
    run = tmp_path / "run"
    code = main(["train", *argv, "teacher.source=cache", f"train.output_dir={run}"])
    assert code == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["soft"] > 0 and rows[-1]["eval/teacher_kl_topk"] > 0
    # with tail samples too: the soft term then also estimates the tail's KL
    tailed = tmp_path / "tailed"
    argv[-1] = f"teacher.cache={tailed}"
    assert main(["cache", *argv, "cache.coverage=0.05", "cache.tail_samples=4"]) == 0
    assert read_manifest(tailed)["tail_samples"] == 4
    run = tmp_path / "run-tailed"
    code = main(["train", *argv, "teacher.source=cache", f"train.output_dir={run}"])
    assert code == 0
    tailed_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert tailed_rows[0]["soft"] > rows[0]["soft"]  # the coarse KL + the tail's (≥ 0 here)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.model={student}", "another teacher.model"),
        ("data.max_length=24", "another data.max_length"),
        ("loss.kd_temperature=2.0", "temperature 1.0, but loss.kd_temperature is 2.0"),
        ("data.max_eval_records=2", "other eval data"),
        ("teacher.cache={root}/nowhere", "no complete teacher cache"),
        ("method=on_policy", "cannot train from a teacher cache"),
    ],
)
def test_a_cache_for_something_else_is_refused_naming_it(folder, override, message, capsys):
    if not (folder / "c" / "manifest.json").is_file():
        assert main(["cache", str(folder / "r.yaml")]) == 0
    override = override.format(student=folder / "student", root=folder)
    code = main(["train", str(folder / "r.yaml"), "teacher.source=cache", override])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupted_and_missing_shards_are_named(folder, tmp_path):
    if not (folder / "c" / "manifest.json").is_file():
        assert main(["cache", str(folder / "r.yaml")]) == 0
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(folder / "c", copy)
    manifest = read_manifest(copy)
    first = copy / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{first.name} is corrupted"):
        CacheReader(copy, "train").rows([0], [0])
    first.unlink()
    with pytest.raises(CacheError, match=f"{first.name} is missing"):
        CacheReader(copy, "train").rows([0], [0])
    assert issubclass(CacheError, DataError)  # printed as one line by the CLI


def test_a_folder_of_another_recipe_is_not_overwritten(folder, tmp_path):
    (tmp_path / "other.txt").write_text("keep me")
    with pytest.raises(RecipeError, match="not empty"):
        main_raise(["cache", str(folder / "r.yaml"), f"teacher.cache={tmp_path}"])
    if not (folder / "c" / "manifest.json").is_file():
        assert main(["cache", str(folder / "r.yaml")]) == 0
    with pytest.raises(RecipeError, match="another recipe"):
        main_raise(["cache", str(folder / "r.yaml"), "cache.top_k=3"])


def main_raise(argv):
    from potstill.cache import run_cache
    from potstill.recipe import load_recipe

    return run_cache(load_recipe(argv[1], argv[2:]))


def test_a_disk_too_small_for_the_cache_is_refused_before_the_teacher_runs(
    folder, tmp_path, monkeypatch
):
    import potstill.utils
    from potstill.errors import OutOfDisk

    monkeypatch.setattr(potstill.utils, "free_bytes", lambda path: 1000)  # what require_free reads
    out = tmp_path / "c"
    with pytest.raises(OutOfDisk, match=r"has 1.0 KiB free.*needs up to .* cache.top_k"):
        main_raise(["cache", str(folder / "r.yaml"), f"teacher.cache={out}"])
    assert not list(out.glob("*.safetensors"))


def test_a_disk_full_while_caching_keeps_the_finished_shards_and_a_rerun_finishes(
    folder, tmp_path, monkeypatch
):
    """The third shard's write runs out of disk (what safetensors raises, a partial file left):
    one error naming the two shards kept, the partial one removed; the same command then
    finishes a cache byte-identical to an uninterrupted one."""
    from safetensors import SafetensorError

    import potstill.teachers.writer as writer
    from potstill.errors import OutOfDisk

    real, saves = writer.save_file, [0]

    def save_file(tensors, path):
        saves[0] += 1
        if saves[0] == 3:
            Path(path).write_bytes(b"cut short")
            raise SafetensorError("Error while serializing: I/O error: No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(writer, "save_file", save_file)
    argv = ["cache", str(folder / "r.yaml"), f"teacher.cache={tmp_path / 'c'}"]
    with pytest.raises(OutOfDisk, match=r"ran out while writing .* its 2 finished shards are kept"):
        main_raise(argv)
    assert not list((tmp_path / "c").glob("*.tmp"))
    monkeypatch.setattr(writer, "save_file", real)
    main_raise(argv)
    main_raise(["cache", str(folder / "r.yaml"), f"teacher.cache={tmp_path / 'whole'}"])
    assert cache_bytes(tmp_path / "c") == cache_bytes(tmp_path / "whole")


PRELUDE = """
import os, sys, time
import potstill.teachers.writer as writer
marker, pause_at = os.environ["MARKER"], int(os.environ.get("PAUSE_AT", "0"))
real, calls = writer.top_k_rows, [0]
def top_k_rows(*args, **kwargs):
    calls[0] += 1
    with open(marker, "a") as f:
        f.write(f"{calls[0]}\\n")
    if calls[0] == pause_at:
        time.sleep(120)
    return real(*args, **kwargs)
writer.top_k_rows = top_k_rows
from potstill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(folder: Path, out: Path, pause_at: int = 0) -> tuple[subprocess.Popen, Path]:
    marker = out.with_name(out.name + ".calls")
    env = {**os.environ, "MARKER": str(marker), "PAUSE_AT": str(pause_at)}
    argv = ["cache", str(folder / "r.yaml"), f"teacher.cache={out}"]
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE, *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, marker


def test_a_cache_killed_while_writing_finishes_equal_to_an_uninterrupted_one(folder, tmp_path):
    whole, _ = run_cli(folder, tmp_path / "whole")  # beside the first killed run
    kills = 0
    for pause_at in (3, 6):  # two kills at different batches, the second after a resume
        proc, marker = run_cli(folder, tmp_path / "killed", pause_at=pause_at)
        deadline = time.monotonic() + 240
        while not (marker.is_file() and len(marker.read_text().split()) >= pause_at):
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        marker.unlink()
        kills += 1
        assert not (tmp_path / "killed" / "manifest.json").exists()
    for run in (whole, run_cli(folder, tmp_path / "killed")[0]):  # the last: the resumed one
        said = run.communicate(timeout=300)[0]  # read as it runs: a full pipe would stall it
        assert run.returncode == 0, said[-2000:]
    assert kills == 2
    assert cache_bytes(tmp_path / "killed") == cache_bytes(tmp_path / "whole")
    a = read_manifest(tmp_path / "whole")
    b = read_manifest(tmp_path / "killed")
    assert a["splits"] == b["splits"]


@pytest.mark.slow
def test_a_few_steps_from_a_cache_of_the_bundled_teacher(tmp_path, smollm2_dir, monkeypatch):
    """The real SmolLM2-135M-Instruct cached, then a 6-to-2-layer student trained from the cache:
    the only model loaded is the student's source (pruned), never a teacher."""
    import potstill.prepare as prepare

    argv = [
        "teacher.model=bundled:smollm2-135m-instruct", f"teacher.cache={tmp_path / 'c'}",
        "student.init=prune", "student.keep_layers=[0, 29]", "data.train=bundled:rg/gsm_symbolic",
        "data.max_train_records=8", "data.max_eval_records=4", "data.max_length=128",
        "cache.top_k=8", "train.max_steps=2", "train.batch_size=4", "train.precision=fp32",
        f"train.output_dir={tmp_path / 'run'}", "train.save_every=0", "train.log_every=1",
    ]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: token_level\n")
    assert main(["cache", str(recipe), *argv]) == 0
    manifest = read_manifest(tmp_path / "c")
    # k=8: 2-byte ids + 2-byte float16 per entry = 32 bytes, plus offsets and shard headers
    assert manifest["vocab_size"] == 49152 and 32 < manifest["bytes_per_position"] < 36
    loaded = []
    real = prepare.load_model
    monkeypatch.setattr(
        prepare, "load_model", lambda name, **kw: loaded.append(name) or real(name, **kw)
    )
    assert main(["train", str(recipe), *argv, "teacher.source=cache"]) == 0
    assert loaded == ["bundled:smollm2-135m-instruct"]  # once: the student's prune source
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["soft"] > 0 and rows[-1]["eval/teacher_kl_topk"] > 0


def test_tail_samples_from_a_server_are_refused_naming_the_fix(folder, tmp_path, capsys):
    argv = ["cache", str(folder / "r.yaml"), f"teacher.cache={tmp_path / 'c'}",
            "teacher.source=server", "teacher.server_url=http://127.0.0.1:9/v1",
            "cache.tail_samples=4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cache.tail_samples=0" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
