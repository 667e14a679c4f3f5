"""kill -9 at random moments of `train`, `cache` and `generate`, many times: each job is run whole
once, then again in chains — killed with SIGKILL at a random time, run again (and killed again)
until it finishes — and what a chain leaves must equal the whole run's, byte for byte (CPU, fp32).

A fork server (tests/_forker.py) starts each attempt as a real process with its imports done, so
one kill costs only the time until the kill. The kill points tried are counted and printed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _forker import Forker
from _sums import write_sums

HERE = Path(__file__).parent
KILLS = {"train": 16, "cache": 12, "generate": 12}  # kill points per job (40 together)


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("forker"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def recipe(tiny_pair_dirs, tmp_path_factory) -> Path:
    """Token-level KD over a tiny teacher/student pair; checkpoints every 2 of 8 steps."""
    root = tmp_path_factory.mktemp("crash")
    write_sums(root)
    path = root / "kd.yaml"
    path.write_text(
        f"method: token_level\nteacher: {{model: {tiny_pair_dirs / 'teacher'}}}\n"
        f"student: {{model: {tiny_pair_dirs / 'student'}, init: pretrained}}\n"
        f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_length: 32}}\n"
        "train: {max_steps: 8, batch_size: 2, grad_accum: 2, lr: 0.01, warmup_steps: 2, "
        "save_every: 2, eval_every: 0, log_every: 1, precision: fp32}\n"
        "cache: {top_k: 4, shard_positions: 64, batch_size: 4}\n"
        f"generate: {{prompts: {root / 'train.jsonl'}, max_new_tokens: 6, batch_size: 4, "
        "temperature: 1.0, verify: none}\n"
    )
    return path


JOBS = {  # job -> (argv for an output folder, the files that must match)
    "train": (
        lambda r, out: ["train", str(r), f"train.output_dir={out}"],
        lambda out: [out / "model" / "model.safetensors"],
    ),
    "cache": (
        lambda r, out: ["cache", str(r), f"teacher.cache={out}"],
        lambda out: sorted(out.glob("*.safetensors")),
    ),
    "generate": (
        lambda r, out: ["generate", str(r), f"generate.output={out / 'g.jsonl'}"],
        lambda out: [out / "g.jsonl", out / "g.jsonl.ledger.jsonl"],
    ),
}


@pytest.mark.parametrize("job", list(JOBS))
def test_kill_9_at_random_points_then_resume_equals_the_whole_run(job, recipe, forker, tmp_path):
    argv, results = JOBS[job]
    whole = tmp_path / "whole"
    first = forker.run(argv(recipe, whole))
    assert first["code"] == 0, first
    expected = {p.relative_to(whole): p.read_bytes() for p in results(whole)}
    assert expected and all(expected.values())
    rng = random.Random(job)
    kills, chains, attempts = 0, 0, 0
    while kills < KILLS[job]:
        chains += 1
        out = tmp_path / f"chain{chains}"
        for _ in range(4):  # up to four kills in a row, then let it finish
            attempts += 1
            result = forker.run(argv(recipe, out), kill_after=rng.uniform(0.0, first["seconds"]))
            if not result["killed"]:
                assert result["code"] == 0, f"chain {chains}: the resumed run failed: {result}"
                break
            kills += 1
        else:
            final = forker.run(argv(recipe, out))
            assert final["code"] == 0, f"chain {chains}: the resumed run failed: {final}"
        got = {p.relative_to(out): p.read_bytes() for p in results(out)}
        assert got.keys() == expected.keys()
        differ = [str(k) for k in got if got[k] != expected[k]]
        assert not differ, f"chain {chains} after {kills} kills: {differ} differ"
        assert attempts < 6 * KILLS[job], "too few attempts landed a kill"
    print(
        f"\n{job}: {kills} kill points over {chains} chains ({attempts} attempts; a whole run "
        f"{first['seconds']:.2f} s), every result identical"
    )
