"""``potstill generate``: the teacher writes the training data of sequence-level and CoT distillation.

1) read the prompts (any ``load_records`` source): a chat record gives its messages up to and
   excluding the final assistant turn, a prompt+completion record its prompt; ``answer``, ``task``
   (and reasoning-gym ``metadata``) are kept for verification;
2) resume: ``<output>.ledger.jsonl`` lists the finished prompts; output records of any other
   prompt and a cut-off last line are dropped (the files are rewritten atomically), finished
   prompts are skipped;
3) per batch of ``generate.batch_size`` prompts: generate ``n`` samples each, verify the final
   answers (``potstill.verify``), keep what ``generate.keep`` says, append the kept records to the
   output and *then* one ledger line per prompt, each file flushed and fsynced — so a kill loses
   at most the batch in flight, and a ledger line always means its records are on disk.
   Every call gets ``generate.seed`` and the backends seed per prompt (hf: each sample from the
   seed, the prompt's tokens and the sample's index; vLLM and OpenAI-compatible servers: a seed
   per request), so a sample does not depend on the batch it ran in and a resumed run writes what
   an uninterrupted one would have (given a deterministic backend; see ``potstill.generation.hf``);
4) ``<output>.report.json`` and a short table: prompts, samples, kept records, acceptance yield
   (verified-correct samples / samples) overall and per task, no-answer count, tokens, seconds.

A written record (``potstill train`` reads the file directly as ``data.train``; loss on the
completion only)::

    {"prompt": <the source's prompt: messages or string>,
     "completion": [{"role": "assistant", "content": ...}] (or a string for string prompts),
     "teacher": backend.teacher_id, "sampling": {temperature, top_p, max_new_tokens, stop, n},
     "seed": generate.seed, "finish_reason": "stop" | "length",
     "prompt_id": "<index>-<hash>", "sample": i, "answer": ..., "task": ...,
     "correct": true | false | null, "extracted": <the answer read from the completion> | null}
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from potstill.data import load_records
from potstill.errors import DataError, GenerationError, RecipeError, VerifyError
from potstill.generation.base import Backend, Completion, Prompt, SamplingParams
from potstill.recipe import GenerateSpec, Recipe
from potstill.utils import atomic_write
from potstill.verify import Verification, is_reasoning_gym_task, reference_of, verify

LEDGER_SUFFIX = ".ledger.jsonl"
REPORT_SUFFIX = ".report.json"
# reasoning=think: what the teacher is asked (the record keeps the prompt without it).
THINK_INSTRUCTION = (
    "Think step by step inside <think> and </think>. After </think>, give the final answer "
    'on its own line as "Answer: X".'
)


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str  # "<index>-<10 hex of the prompt's hash>": stable across runs, unique
    prompt: Prompt  # the source's prompt, unchanged: what the record's "prompt" holds
    answer: str | None  # reference answer for verification
    task: str | None  # e.g. a reasoning-gym task name
    question: str | None  # the record's, else the last user turn (reasoning-gym's scorer reads it)
    metadata: dict | None  # reasoning-gym entry metadata, when the record carries it


# ---------------------------------------------------------------------------------------------
# prompts


def load_prompts(
    source: str, *, split: str = "train", limit: int | None = None
) -> list[PromptItem]:
    """The prompts of ``source`` with what verification needs; raises DataError naming a record
    that has no prompt."""
    records = load_records(source, split=split, limit=limit, validate=False)
    items = []
    for i, record in enumerate(records):
        prompt = prompt_of(record, where=f"{source} record {i}")
        items.append(
            PromptItem(
                prompt_id=f"{i}-{_digest(prompt)[:10]}",
                prompt=prompt,
                **reference_of(record, prompt),
            )
        )
    return items


def prompt_of(record: Any, *, where: str) -> Prompt:
    """messages -> all but a final assistant turn; prompt(+completion) -> the prompt."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    found = f"keys found: {sorted(record)}"
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where, found)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: 'messages' holds only an assistant reply, no prompt")
        return messages
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) and prompt.strip():
            return prompt
        return _messages(prompt, "prompt", where, found)
    raise DataError(
        f"{where} has neither 'messages' nor 'prompt' ({found}); potstill generate needs a "
        "prompt: {'prompt': '...'} or chat {'messages': [{'role': 'user', ...}]}"
    )


def _messages(value: Any, key: str, where: str, found: str) -> list[dict]:
    ok = isinstance(value, list) and value
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise DataError(
            f"{where}: '{key}' must be a non-empty list of {{'role': ..., 'content': ...}} "
            f"messages with string contents{' (or a non-empty string)' if key == 'prompt' else ''} "
            f"({found})"
        )
    return list(value)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def teacher_prompt(prompt: Prompt, instruction: str | None) -> Prompt:
    """The prompt as the teacher sees it: ``instruction`` appended to the last user turn."""
    if not instruction:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt.rstrip()}\n\n{instruction}\n"
    messages = [dict(m) for m in prompt]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = f"{m['content'].rstrip()}\n\n{instruction}"
            return messages
    return [*messages, {"role": "user", "content": instruction}]


def instruction_of(g: GenerateSpec) -> str | None:
    if g.instruction is not None:
        return g.instruction or None
    return THINK_INSTRUCTION if g.reasoning == "think" else None


# ---------------------------------------------------------------------------------------------
# one prompt's samples -> verdicts, kept records, ledger line


def select(verdicts: Sequence[Verification], keep: str) -> list[int]:
    """Indices of the samples to keep: all | correct | first_correct (best-of-n)."""
    if keep == "all":
        return list(range(len(verdicts)))
    correct = [i for i, v in enumerate(verdicts) if v.correct]
    return correct[:1] if keep == "first_correct" else correct


def judge_prompt(
    item: PromptItem,
    completions: Sequence[Completion],
    g: GenerateSpec,
    *,
    teacher: str,
    settings: str,
) -> tuple[list[dict], dict]:
    """(kept records, ledger line) for one prompt's samples."""
    verdicts = [
        verify(
            c.text,
            answer=item.answer,
            task=item.task,
            question=item.question,
            metadata=item.metadata,
            mode=g.verify,
            think=g.reasoning == "think",
        )
        for c in completions
    ]
    sampling = {
        "temperature": g.temperature,
        "top_p": g.top_p,
        "max_new_tokens": g.max_new_tokens,
        "stop": list(g.stop),
        "n": g.n,
    }
    kept = select(verdicts, g.keep)
    records = []
    for i in kept:
        c, v = completions[i], verdicts[i]
        record: dict[str, Any] = {
            "prompt": item.prompt,
            "completion": c.text
            if isinstance(item.prompt, str)
            else [{"role": "assistant", "content": c.text}],
            "teacher": teacher,
            "sampling": sampling,
            "seed": g.seed,
            "finish_reason": c.finish_reason,
            "prompt_id": item.prompt_id,
            "sample": i,
        }
        if item.answer is not None:
            record["answer"] = item.answer
        if item.task is not None:
            record["task"] = item.task
        record["correct"] = v.correct
        if v.method != "none":
            record["extracted"] = v.answer
        records.append(record)
    checked = [v for v in verdicts if v.correct is not None]
    verifying = g.verify != "none"
    line = {
        "prompt_id": item.prompt_id,
        "task": item.task,
        "samples": len(completions),
        "correct": sum(bool(v.correct) for v in checked) if checked else None,
        "kept": len(kept),
        "no_answer": sum(v.answer is None for v in verdicts) if verifying else None,
        "tokens": sum(c.num_tokens for c in completions),
        "verified_by": sorted({v.method for v in checked}),
        "settings": settings,
    }
    return records, line


# ---------------------------------------------------------------------------------------------
# files: append durably, resume safely


def append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Append rows as JSON lines, flushed and fsynced before returning."""
    if not rows:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(_dump(rows))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(rows, clean). A cut-off last line (an interrupted append) is dropped and ``clean`` is
    False; a bad line anywhere else means the file was edited, and raises."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    clean = text.endswith("\n") or not text
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last, unterminated piece: an append cut short
                clean = False
                continue
            raise DataError(
                f"{path}:{n}: not valid JSON in the middle of the file (not an interrupted "
                "write); fix or delete that line, or delete the file and its ledger to start over"
            ) from None
    return rows, clean


def _dump(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def resume(output: Path, items: Sequence[PromptItem], settings: str) -> list[dict]:
    """Ledger lines of the prompts already finished; trims the output to exactly their records."""
    ledger = ledger_path(output)
    if not ledger.exists():
        if output.exists() and output.stat().st_size > 0:
            raise DataError(
                f"{output} exists but has no ledger {ledger.name}, so potstill generate did not "
                "write it (or the ledger was deleted); set generate.output to a new file, or "
                "delete this one to start over"
            )
        return []
    lines, clean = read_jsonl(ledger)
    known = {it.prompt_id for it in items}
    for line in lines:
        if line.get("settings") != settings:
            raise RecipeError(
                f"{output} was started with other generation settings (teacher, sampling, seed, "
                "reasoning, instruction, verify or keep); re-run with the same ones to resume, "
                "or set generate.output to a new file"
            )
        if line.get("prompt_id") not in known:
            raise RecipeError(
                f"{ledger} lists prompt {line.get('prompt_id')!r}, which generate.prompts no "
                "longer yields (other source, split or order); use the same prompts to resume, "
                "or set generate.output to a new file"
            )
    if not clean:
        atomic_write(ledger, _dump(lines))
    done = {line["prompt_id"]: line for line in lines}
    records, out_clean = read_jsonl(output) if output.exists() else ([], True)
    kept = [r for r in records if r.get("prompt_id") in done]
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + 1
    bad = [pid for pid, line in done.items() if counts.get(pid, 0) != line["kept"]]
    if bad:
        raise DataError(
            f"{output} and its ledger disagree on prompt {bad[0]} ({counts.get(bad[0], 0)} "
            f"records, ledger says {done[bad[0]]['kept']}); were the files edited? Delete both "
            "to start over"
        )
    if not out_clean or len(kept) != len(records):
        atomic_write(output, _dump(kept))
    return list(done.values())


def ledger_path(output: Path) -> Path:
    return output.with_name(output.name + LEDGER_SUFFIX)


def report_path(output: Path) -> Path:
    return output.with_name(output.name + REPORT_SUFFIX)


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class GenerateReport:
    output: str
    teacher: str
    prompts_total: int  # prompts in the source (after max_prompts)
    prompts: int  # prompts finished, this run and earlier ones
    prompts_this_run: int
    samples: int
    kept: int  # records in the output
    correct: int | None  # verified-correct samples (None: nothing verified)
    solved: int | None  # prompts with at least one correct sample
    no_answer: int | None  # samples with no final answer to read (None: verify none)
    tokens: int  # completion tokens of every finished prompt's samples, all runs
    tokens_this_run: int  # decoded in this run (a repeated prompt's samples are not drawn again)
    repeats_this_run: int  # prompts that took the samples of an earlier identical prompt
    seconds: float  # generation time of this run (model loading excluded)
    acceptance_yield: float | None  # correct / verified samples
    per_task: dict[str, dict] = field(default_factory=dict)
    verified_by: dict[str, int] = field(default_factory=dict)  # verdict method -> prompts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A few lines for the terminal."""
        head = (
            f"{self.prompts:,}/{self.prompts_total:,} prompts ({self.prompts_this_run:,} this "
            f"run), {self.samples:,} samples -> {self.kept:,} records in {self.output}"
        )
        rows = [("task", "prompts", "samples", "correct", "yield", "solved", "no answer", "kept")]
        tasks = {k: v for k, v in self.per_task.items() if k != "-"}
        for name, t in [*tasks.items(), ("all", self._totals())]:
            rows.append(
                (
                    name,
                    f"{t['prompts']:,}",
                    f"{t['samples']:,}",
                    _or_dash(t["correct"], "{:,}"),
                    _or_dash(t["yield"], "{:.1%}"),
                    _or_dash(t["solved"], "{:,}"),
                    _or_dash(t["no_answer"], "{:,}"),
                    f"{t['kept']:,}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        rate = self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0
        tail = (
            f"{self.tokens:,} completion tokens; this run {self.tokens_this_run:,} in "
            f"{self.seconds:.1f} s ({rate:,.0f} tokens/s); teacher {self.teacher}"
        )
        if self.repeats_this_run:
            tail += (
                f"\n{self.repeats_this_run:,} prompts repeat an earlier one and took its samples"
            )
        return "\n".join([head, *lines, tail])

    def _totals(self) -> dict:
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "correct": self.correct,
            "yield": self.acceptance_yield,
            "solved": self.solved,
            "no_answer": self.no_answer,
            "kept": self.kept,
        }


def _or_dash(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def summarize(lines: Sequence[dict]) -> dict[str, Any]:
    """Totals over ledger lines: prompts, samples, correct, solved, no_answer, kept, tokens, yield."""
    verified = [x for x in lines if x["correct"] is not None]
    answered = [x for x in lines if x["no_answer"] is not None]
    samples_verified = sum(x["samples"] for x in verified)
    correct = sum(x["correct"] for x in verified) if verified else None
    return {
        "prompts": len(lines),
        "samples": sum(x["samples"] for x in lines),
        "correct": correct,
        "solved": sum(x["correct"] > 0 for x in verified) if verified else None,
        "no_answer": sum(x["no_answer"] for x in answered) if answered else None,
        "kept": sum(x["kept"] for x in lines),
        "tokens": sum(x["tokens"] for x in lines),
        "yield": correct / samples_verified if verified and samples_verified else None,
    }


def build_report(
    lines: Sequence[dict],
    *,
    output: Path,
    teacher: str,
    prompts_total: int,
    prompts_this_run: int,
    tokens_this_run: int,
    seconds: float,
    repeats_this_run: int = 0,
) -> GenerateReport:
    total = summarize(lines)
    by_task: dict[str, list[dict]] = {}
    verified_by: dict[str, int] = {}
    for line in lines:
        by_task.setdefault(line.get("task") or "-", []).append(line)
        for method in line.get("verified_by", []):
            verified_by[method] = verified_by.get(method, 0) + 1
    return GenerateReport(
        output=str(output),
        teacher=teacher,
        prompts_total=prompts_total,
        prompts=total["prompts"],
        prompts_this_run=prompts_this_run,
        samples=total["samples"],
        kept=total["kept"],
        correct=total["correct"],
        solved=total["solved"],
        no_answer=total["no_answer"],
        tokens=total["tokens"],
        tokens_this_run=tokens_this_run,
        repeats_this_run=repeats_this_run,
        seconds=round(seconds, 3),
        acceptance_yield=total["yield"],
        per_task={name: summarize(rows) for name, rows in sorted(by_task.items())},
        verified_by=verified_by,
    )


# ---------------------------------------------------------------------------------------------
# backends


def build_backend(r: Recipe) -> Backend:
    """The backend ``generate.backend`` names; each optional package is imported only here."""
    g = r.generate
    if g.backend == "openai":
        if not (g.base_url and g.model):
            raise RecipeError(
                "`generate.backend: openai` needs `generate.base_url` (e.g. "
                "http://127.0.0.1:8000/v1 for potstill serve) and `generate.model` (the name "
                "the server knows the model by)"
            )
        if g.api_key_env and not os.environ.get(g.api_key_env):
            raise RecipeError(
                f"`generate.api_key_env` names {g.api_key_env}, which is not set; "
                f"export {g.api_key_env}=<your key> first"
            )
        from potstill.generation.openai_http import OpenAIBackend

        return OpenAIBackend(
            g.base_url,
            g.model,
            api_key_env=g.api_key_env,
            chat=g.chat,
            concurrency=g.concurrency,
            max_retries=g.max_retries,
            timeout=g.timeout,
        )
    model = g.model or r.teacher.model
    if not model:
        raise RecipeError(
            f"`generate.backend: {g.backend}` needs a model: set `generate.model` or `teacher.model`"
        )
    if g.backend == "hf":
        from potstill.generation.hf import HFBackend

        return HFBackend(
            model,
            dtype=r.teacher.dtype,
            batch_size=g.batch_size * g.n,  # one backend call = one decode batch of rows
            trust_remote_code=r.teacher.trust_remote_code,
            allow_pickle=r.teacher.allow_pickle,
        )
    from potstill.generation.vllm_engine import VLLMBackend

    # A missing vLLM raises GenerationError with the install hint (a one-line user error).
    return VLLMBackend(model, dtype=r.teacher.dtype, trust_remote_code=r.teacher.trust_remote_code)


# ---------------------------------------------------------------------------------------------
# the run


def check_verifiable(items: Sequence[PromptItem], g: GenerateSpec, source: str) -> None:
    """Fail before any generation when verification cannot work on these prompts."""
    if g.verify == "none":
        return
    missing = [i for i, it in enumerate(items) if it.answer is None]
    if missing and (g.verify != "auto" or g.keep != "all"):
        raise DataError(
            f"{len(missing)} of {len(items)} prompts from {source} (first: record {missing[0]}) "
            f"have no 'answer' to check against, but generate.verify is {g.verify} and "
            f"generate.keep is {g.keep}; add an 'answer' field, or set generate.verify=none "
            "and generate.keep=all"
        )
    if g.verify == "reasoning_gym":
        bad = next((i for i, it in enumerate(items) if not is_reasoning_gym_task(it.task)), None)
        if bad is not None:
            raise VerifyError(
                f"generate.verify=reasoning_gym, but {source} record {bad} has task "
                f"{items[bad].task!r}, not a reasoning-gym task (is reasoning-gym installed? "
                "pip install 'potstill[bundled]'); use generate.verify=auto for other data"
            )


def settings_key(g: GenerateSpec, teacher: str) -> str:
    """A short hash of everything that shapes the records; a resume must match it."""
    settings = {
        "teacher": teacher,
        "n": g.n,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "max_new_tokens": g.max_new_tokens,
        "stop": list(g.stop),
        "seed": g.seed,
        "chat": g.chat,
        "reasoning": g.reasoning,
        "instruction": instruction_of(g),
        "verify": g.verify,
        "keep": g.keep,
    }
    return _digest(settings)[:12]


def run_generate(
    recipe: Recipe, *, backend: Backend | None = None, progress: bool = True
) -> GenerateReport:
    """Generate, verify and keep teacher completions as ``recipe.generate`` says; resumable.

    ``backend``: use this one (the caller closes it) instead of building ``generate.backend``.
    Raises GenerationError (saying how far it got and that re-running resumes) when the backend
    fails; everything finished before stays on disk.
    """
    g = recipe.generate
    output = Path(g.output).expanduser()
    items = load_prompts(g.prompts, split=g.prompts_split, limit=g.max_prompts)
    check_verifiable(items, g, g.prompts)
    own_backend = backend is None
    if backend is None:
        backend = build_backend(recipe)
    try:
        return _run(g, items, output, backend, progress=progress)
    finally:
        if own_backend:
            backend.close()


def _run(
    g: GenerateSpec,
    items: Sequence[PromptItem],
    output: Path,
    backend: Backend,
    *,
    progress: bool,
) -> GenerateReport:
    teacher = backend.teacher_id
    settings = settings_key(g, teacher)
    existed = output.exists()
    new_dirs = [d for d in (output.parent, *output.parent.parents) if not d.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = resume(output, items, settings)
    # the ledger first: a kill after the first records and before their ledger line must leave a
    # file the next run trims, not one it takes for someone else's
    ledger_path(output).touch()
    output.touch()  # exists even when nothing is kept, so `potstill train` says "no records"
    done = {line["prompt_id"] for line in lines}
    todo = [it for it in items if it.prompt_id not in done]
    instruction = instruction_of(g)
    if progress:
        print(
            f"generate: {len(items):,} prompts from {g.prompts} ({len(done):,} already done), "
            f"n={g.n}, temperature={g.temperature}, teacher {teacher} -> {output}"
        )
    started = time.perf_counter()
    tokens_this_run = 0  # decoded by the backend: repeats are not drawn again
    finished_this_run = 0
    repeats_this_run = 0
    # A prompt that the source repeats is drawn once: backends seed each sample from
    # generate.seed and the prompt, so drawing it again would give the same samples (and on a
    # task with few distinct questions, e.g. small sums, half the prompts are repeats).
    prompts_todo = [teacher_prompt(it.prompt, instruction) for it in todo]
    keys_todo = [_digest(p) for p in prompts_todo]  # identical prompts, identical keys
    repeated = {k for k, count in Counter(keys_todo).items() if count > 1}  # only these kept
    answered: dict[str, list] = {}  # digest of a repeated prompt -> its n completions

    def report() -> GenerateReport:
        result = build_report(
            lines,
            output=output,
            teacher=teacher,
            prompts_total=len(items),
            prompts_this_run=finished_this_run,
            repeats_this_run=repeats_this_run,
            tokens_this_run=tokens_this_run,
            seconds=time.perf_counter() - started,
        )
        atomic_write(report_path(output), json.dumps(result.to_dict(), indent=2) + "\n")
        return result

    bar = tqdm(
        total=len(items), initial=len(done), unit="prompt", desc="generate", disable=not progress
    )
    try:
        for start in range(0, len(todo), g.batch_size):
            batch = todo[start : start + g.batch_size]
            params = SamplingParams(
                n=g.n,
                temperature=g.temperature,
                top_p=g.top_p,
                max_new_tokens=g.max_new_tokens,
                stop=tuple(g.stop),
                seed=g.seed,  # backends seed per prompt (and sample): batching does not matter
            )
            prompts = prompts_todo[start : start + g.batch_size]
            keys = keys_todo[start : start + g.batch_size]
            fresh = list(dict.fromkeys(k for k in keys if k not in answered))  # first occurrences
            try:
                new: dict[str, list] = {}
                if fresh:
                    drawn = backend.generate([prompts[keys.index(k)] for k in fresh], params)
                    if len(drawn) != len(fresh) or any(len(o) != g.n for o in drawn):
                        raise GenerationError(
                            f"the backend returned {[len(o) for o in drawn]} completions for "
                            f"{len(fresh)} prompts × n={g.n}"
                        )
                    new = dict(zip(fresh, drawn, strict=True))
                outputs = [new[k] if k in new else answered[k] for k in keys]  # [len(batch)][n]
                answered.update((k, o) for k, o in new.items() if k in repeated)
            except GenerationError as e:
                if not lines and not existed:  # nothing done: leave nothing behind
                    output.unlink(missing_ok=True)
                    ledger_path(output).unlink(missing_ok=True)
                    for d in new_dirs:  # deepest first
                        if d.is_dir() and not any(d.iterdir()):
                            d.rmdir()
                    raise GenerationError(
                        f"generation stopped before any prompt was done: {e}"
                    ) from e
                kept = sum(line["kept"] for line in lines)
                report()
                raise GenerationError(
                    f"generation stopped: {e} — {len(lines):,} of {len(items):,} prompts are done "
                    f"({kept:,} records kept in {output}); re-run the same command to resume"
                ) from e
            records, new_lines = [], []
            for item, completions in zip(batch, outputs, strict=True):
                kept_records, line = judge_prompt(
                    item, completions, g, teacher=teacher, settings=settings
                )
                records += kept_records
                new_lines.append(line)
            append_jsonl(output, records)  # records first: a ledger line promises they are on disk
            append_jsonl(ledger_path(output), new_lines)
            lines += new_lines
            finished_this_run += len(batch)
            repeats_this_run += len(batch) - len(fresh)
            tokens_this_run += sum(c.num_tokens for samples in new.values() for c in samples)
            bar.update(len(batch))
            if progress:
                elapsed = max(time.perf_counter() - started, 1e-9)
                running = summarize(lines)["yield"]
                bar.set_postfix_str(
                    f"{tokens_this_run / elapsed:,.0f} tok/s"
                    + ("" if running is None else f", yield {running:.1%}")
                )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(lines):,} of {len(items):,} prompts are done in {output}; "
            "re-run the same command to resume",
            file=sys.stderr,
        )
        report()
        raise
    finally:
        bar.close()
    return report()
