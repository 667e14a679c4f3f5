"""`potstill generate` with a scripted in-test backend: records, resume after a kill, keep modes,
verification counts, errors and the reasoning=think format."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from potstill.data import load_records, record_format, tokenize_records
from potstill.errors import DataError, GenerationError, RecipeError
from potstill.generate import (
    THINK_INSTRUCTION,
    ledger_path,
    load_prompts,
    report_path,
    run_generate,
    teacher_prompt,
)
from potstill.generation.base import Completion
from potstill.recipe import load_recipe

# ---------------------------------------------------------------------------------------------
# a deterministic backend


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def arithmetic_script(prompt: str, sample: int, seed: int) -> str:
    """Sample 1 and 2 of each prompt are right, 0 and 3 wrong; a hash of (seed, prompt, sample)
    decides the wording, so a different seed or prompt gives different text."""
    a, b = map(int, re.search(r"(-?\d+) \+ (-?\d+)", prompt).groups())
    noise = hashlib.sha256(f"{seed}|{prompt}|{sample}".encode()).hexdigest()[:6]
    value = a + b if sample % 4 in (1, 2) else a + b + 1
    if THINK_INSTRUCTION in prompt:
        return f"<think>{a} plus {b} ({noise})</think>\nAnswer: {value}"
    return f"{a} + {b} = {value} ({noise})\n\nAnswer: {value}"


class ScriptedBackend:
    """Completions from ``script(prompt text, sample index, seed)``; it raises GenerationError once
    it has served ``fail_after`` prompts, like a server that goes away."""

    teacher_id = "fake-teacher"

    def __init__(self, script=arithmetic_script, fail_after: int | None = None):
        self.script, self.fail_after = script, fail_after
        self.served = 0
        self.seen: list = []  # every prompt as the teacher saw it

    def generate(self, prompts, params):
        if self.fail_after is not None and self.served + len(prompts) > self.fail_after:
            raise GenerationError("server went away (HTTP 503)")
        self.served += len(prompts)
        self.seen += prompts
        out = []
        for p in prompts:
            texts = [self.script(_text(p), i, params.seed) for i in range(params.n)]
            out.append([Completion(t, "stop", len(t.split())) for t in texts])
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# fixtures


def write_prompts(path: Path, count: int = 7) -> Path:
    """Chat records with a final assistant turn, and prompt+completion strings, mixed."""
    rows = []
    for i in range(count):
        question = f"Calculate {i} + {2 * i + 1}."
        answer = str(3 * i + 1)
        if i % 3 == 2:
            rows.append({"prompt": question, "completion": "gold", "answer": answer})
        else:
            chat = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"gold reply {answer}"},
            ]
            rows.append({"messages": chat, "answer": answer, "task": "sums"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(tmp_path: Path, *overrides: str, name: str = "out"):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts)
    return load_recipe(
        None,
        [
            "method=sequence_level",
            "student.model=unused",
            f"generate.prompts={prompts}",
            f"generate.output={tmp_path / name / 'completions.jsonl'}",
            "generate.batch_size=2",
            *overrides,
        ],
    )


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


SAMPLED = ("generate.n=4", "generate.temperature=0.7")


# ---------------------------------------------------------------------------------------------
# tests


def test_records_load_through_the_data_layer_and_tokenize(tmp_path, smollm2_tokenizer):
    r = make_recipe(tmp_path, *SAMPLED)
    report = run_generate(r, backend=ScriptedBackend(), progress=False)
    out = Path(r.generate.output)
    records = load_records(str(out))  # what `potstill train data.train=<output>` reads
    assert len(records) == report.kept == 7 * 4
    assert {record_format(x) for x in records} == {"prompt_completion"}
    first, string_one = records[0], records[2 * 4]
    assert first["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Calculate 0 + 1."},
    ]  # the final assistant turn is dropped
    assert first["completion"][0]["role"] == "assistant"
    assert isinstance(string_one["prompt"], str) and isinstance(string_one["completion"], str)
    assert first["teacher"] == "fake-teacher" and first["seed"] == 0
    assert first["sampling"] == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_new_tokens": 256,
        "stop": [],
        "n": 4,
    }
    assert [x["sample"] for x in records[:4]] == [0, 1, 2, 3]
    assert [x["correct"] for x in records[:4]] == [False, True, True, False]
    assert (first["answer"], first["task"], first["finish_reason"]) == ("1", "sums", "stop")
    assert "task" not in string_one  # only when the source has one
    examples, stats = tokenize_records(records, smollm2_tokenizer, max_length=128)
    assert stats.examples == len(records) and stats.dropped == 0
    ex = examples[0]
    targets = [t for t, m in zip(ex.input_ids, ex.target_mask, strict=True) if m]
    learned = smollm2_tokenizer.decode(targets)  # the reply and its end-of-turn, never the prompt
    assert learned.startswith(first["completion"][0]["content"]) and "Calculate" not in learned
    # the report: overall and per task, written next to the output
    assert (report.prompts, report.samples, report.correct, report.solved) == (7, 28, 14, 7)
    assert report.acceptance_yield == pytest.approx(0.5) and report.no_answer == 0
    assert report.per_task["sums"]["prompts"] == 5 and report.per_task["-"]["prompts"] == 2
    saved = json.loads(report_path(out).read_text())
    assert saved["kept"] == 28 and saved["tokens"] == report.tokens > 0
    table = report.table()
    assert "sums" in table and "50.0%" in table and "tokens/s" in table


def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tmp_path):
    reference = make_recipe(tmp_path, *SAMPLED, "generate.keep=correct", name="whole")
    run_generate(reference, backend=ScriptedBackend(), progress=False)
    expected = Path(reference.generate.output).read_bytes()

    broken = make_recipe(tmp_path, *SAMPLED, "generate.keep=correct", name="killed")
    out = Path(broken.generate.output)
    with pytest.raises(GenerationError) as info:
        run_generate(broken, backend=ScriptedBackend(fail_after=5), progress=False)
    message = str(info.value)
    assert "server went away" in message and "4 of 7 prompts are done" in message
    assert "8 records kept" in message and "re-run the same command to resume" in message
    assert len(read(ledger_path(out))) == 4 and len(read(out)) == 8
    # a kill during the next batch: its records reached the output, its ledger lines did not,
    # and the last record was cut mid-line
    first_next = read(Path(reference.generate.output))[8]
    with out.open("a") as f:
        f.write(json.dumps(first_next) + "\n" + json.dumps(first_next)[:40])
    with ledger_path(out).open("a") as f:
        f.write('{"prompt_id": "4-')  # a cut-off ledger line too

    backend = ScriptedBackend()
    # another batch size: samples are seeded per prompt, so batching does not matter
    resumed = load_recipe(
        None,
        [
            *(
                f"generate.{k}={json.dumps(v)}"
                for k, v in vars(broken.generate).items()
                if k != "batch_size"
            ),
            "generate.batch_size=3",
            "method=sequence_level",
            "student.model=unused",
        ],
    )
    report = run_generate(resumed, backend=backend, progress=False)
    assert backend.served == 3  # only the unfinished prompts
    assert out.read_bytes() == expected
    assert (report.prompts, report.prompts_this_run, report.kept) == (7, 3, 14)
    assert [x["prompt_id"] for x in read(ledger_path(out))] == [
        x["prompt_id"] for x in read(ledger_path(Path(reference.generate.output)))
    ]
    # finished: a third run generates nothing
    again = run_generate(resumed, backend=ScriptedBackend(fail_after=0), progress=False)
    assert again.prompts_this_run == 0 and out.read_bytes() == expected


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    r = make_recipe(tmp_path, "generate.max_prompts=2")
    run_generate(r, backend=ScriptedBackend(), progress=False)
    with pytest.raises(RecipeError, match="other generation settings"):
        run_generate(
            make_recipe(tmp_path, "generate.max_prompts=2", "generate.seed=1"),
            backend=ScriptedBackend(),
            progress=False,
        )
    foreign = make_recipe(tmp_path, name="mine")
    Path(foreign.generate.output).parent.mkdir()
    Path(foreign.generate.output).write_text('{"text": "my precious data"}\n')
    with pytest.raises(DataError, match="has no ledger"):
        run_generate(foreign, backend=ScriptedBackend(), progress=False)
    assert "precious" in Path(foreign.generate.output).read_text()  # left alone


@pytest.mark.parametrize(
    ("keep", "per_prompt", "samples"),
    [("all", 4, [0, 1, 2, 3]), ("correct", 2, [1, 2]), ("first_correct", 1, [1])],
)
def test_keep_modes(tmp_path, keep, per_prompt, samples):
    r = make_recipe(tmp_path, *SAMPLED, f"generate.keep={keep}")
    report = run_generate(r, backend=ScriptedBackend(), progress=False)
    records = read(r.generate.output)
    assert len(records) == report.kept == 7 * per_prompt
    assert [x["sample"] for x in records[:per_prompt]] == samples
    assert report.correct == 14  # verification does not depend on what is kept
    ledger = read(ledger_path(Path(r.generate.output)))
    assert {line["kept"] for line in ledger} == {per_prompt}


def test_a_repeated_prompt_is_drawn_once(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [write_prompts(tmp_path / "seven.jsonl").read_text().splitlines()[i] for i in (0, 1, 0)]
    prompts.write_text("\n".join([*rows, rows[1], rows[0]]) + "\n")  # 0 1 0 1 0
    r = make_recipe(tmp_path, *SAMPLED, "generate.batch_size=2")
    backend = ScriptedBackend()
    report = run_generate(r, backend=backend, progress=False)
    assert len(backend.seen) == 2 and report.repeats_this_run == 3
    records = read(r.generate.output)
    assert len(records) == report.kept == 5 * 4
    texts = [[x["completion"][0]["content"] for x in records if x["prompt_id"] == pid] for pid in
             dict.fromkeys(x["prompt_id"] for x in records)]  # fmt: skip
    assert texts[0] == texts[2] == texts[4] != texts[1] == texts[3]  # the same samples as drawn
    ledger = [line["tokens"] for line in read(ledger_path(Path(r.generate.output)))]
    assert report.tokens_this_run == ledger[0] + ledger[1]  # only the first two were decoded
    assert report.tokens == sum(ledger) and ledger[0] == ledger[2] == ledger[4]
    assert "3 prompts repeat an earlier one and took its samples" in report.table()


def test_no_answer_is_counted_not_fatal(tmp_path):
    def shy(prompt, sample, seed):
        return "I would rather not say." if sample == 0 else arithmetic_script(prompt, 1, seed)

    r = make_recipe(tmp_path, "generate.n=2", "generate.temperature=1", "generate.keep=correct")
    report = run_generate(r, backend=ScriptedBackend(shy), progress=False)
    assert (report.no_answer, report.correct, report.kept) == (7, 7, 7)
    assert report.per_task["sums"]["no_answer"] == 5
    unverified = make_recipe(tmp_path, "generate.verify=none", name="plain")
    report = run_generate(unverified, backend=ScriptedBackend(shy), progress=False)
    assert report.correct is None and report.acceptance_yield is None and report.no_answer is None
    assert {x["correct"] for x in read(unverified.generate.output)} == {None}


def test_records_without_a_prompt_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"text": "no prompt", "answer": "3"}\n')
    with pytest.raises(
        DataError, match=r"record 1 has neither 'messages' nor 'prompt'.*\['answer', 'text'\]"
    ):
        load_prompts(str(bad))
    prompt_only = load_prompts(str(bad), limit=1)  # prompt-only records are fine here
    assert prompt_only[0].prompt == "1 + 1 =" and prompt_only[0].answer == "2"


def test_verification_needs_answers_unless_told_otherwise(tmp_path):
    prompts = tmp_path / "open.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "Calculate 1 + 2."}]}\n')
    base = ["method=sequence_level", "student.model=unused", f"generate.prompts={prompts}"]
    out = f"generate.output={tmp_path / 'o.jsonl'}"
    with pytest.raises(DataError, match="no 'answer' to check against"):
        run_generate(
            load_recipe(None, [*base, out, "generate.keep=correct"]), backend=ScriptedBackend()
        )
    report = run_generate(
        load_recipe(None, [*base, out]), backend=ScriptedBackend(), progress=False
    )
    assert report.kept == 1 and report.correct is None  # verify auto, keep all: kept unchecked


def test_generation_error_is_a_one_line_user_error(tmp_path, capsys, monkeypatch):
    import potstill.generate
    from potstill.cli import main

    r = make_recipe(tmp_path, "generate.max_prompts=4")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        json.dumps(
            {
                "method": "sequence_level",
                "student": {"model": "unused"},
                "generate": vars(r.generate),
            }
        )
    )
    monkeypatch.setattr(
        potstill.generate, "build_backend", lambda recipe: ScriptedBackend(fail_after=3)
    )
    assert main(["generate", str(recipe_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("potstill generate: error: generation stopped")
    assert "2 of 4 prompts are done" in err and "re-run the same command to resume" in err
    monkeypatch.setattr(potstill.generate, "build_backend", lambda recipe: ScriptedBackend())
    assert main(["generate", str(recipe_file)]) == 0  # resumes
    assert "4/4 prompts (2 this run)" in capsys.readouterr().out


def test_reasoning_think(tmp_path):
    def lazy_thinker(prompt, sample, seed):  # sample 1 never closes its reasoning block
        text = arithmetic_script(prompt, 1, seed)
        return text.split("</think>")[0] if sample == 1 else text

    r = make_recipe(tmp_path, "generate.reasoning=think", "generate.n=2", "generate.temperature=1")
    backend = ScriptedBackend(lazy_thinker)
    report = run_generate(r, backend=backend, progress=False)
    # the teacher is asked for the format ...
    chat = backend.seen[0]
    assert chat[-1]["content"] == f"Calculate 0 + 1.\n\n{THINK_INSTRUCTION}"
    assert chat[0] == {"role": "system", "content": "Be brief."}
    assert backend.seen[2] == f"Calculate 2 + 5.\n\n{THINK_INSTRUCTION}\n"  # a string prompt
    # ... but the record keeps the plain prompt and the teacher's whole reply
    record = read(r.generate.output)[0]
    assert record["prompt"][-1]["content"] == "Calculate 0 + 1."
    reply = record["completion"][0]["content"]
    assert reply.startswith("<think>") and reply.endswith("</think>\nAnswer: 1")
    assert (record["correct"], record["extracted"]) == (True, "1")
    assert (report.correct, report.no_answer) == (7, 7)  # unclosed blocks have no answer
    assert teacher_prompt([{"role": "system", "content": "s"}], "do it") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "do it"},
    ]


def test_bundled_reasoning_gym_prompts(tmp_path):
    pytest.importorskip("reasoning_gym")
    source = (
        "bundled:rg/basic_arithmetic?size=4&min_terms=2&max_terms=2&max_digits=1&operators=+"
        "&allow_negation=false&allow_parentheses=false"
    )
    r = make_recipe(
        tmp_path, f"generate.prompts={source}", "generate.verify=reasoning_gym", *SAMPLED,
        "generate.keep=first_correct",
    )  # fmt: skip
    report = run_generate(r, backend=ScriptedBackend(), progress=False)
    assert report.per_task["basic_arithmetic"]["yield"] == pytest.approx(0.5)
    assert report.verified_by == {"reasoning_gym": 4} and report.kept == 4
