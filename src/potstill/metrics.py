"""The metric registry: every number a report card, a comparison or the demo shows of a model.

Each :class:`Metric` says how it reads (its words, which way is better, its format) and which
*measurement* computes it; each measurement declares what it needs (:data:`NEEDS`). For one model,
:func:`measure` runs the measurements whose needs its :class:`Context` meets and returns their
metrics; tables (:func:`markdown_table`) and verdicts (:func:`verdict`) read the registry, so no
command decides what to show from a method's name.

Measurements:

    held_out    teacher-forced on the held-out set (:func:`potstill.evaluate.evaluate`): forward
                and reverse KL to the teacher, top-1 agreement, perplexity, bits per byte
    generation  the model completes the held-out prompts itself, greedy and sampled at T=1 with
                fixed seeds: task accuracy checked by :func:`potstill.verify.verify` where the
                records carry an ``answer``; the sampled completions' diversity (distinct-2,
                repetition) and reverse KL to the teacher (:func:`~potstill.evaluate.score_own_samples`)
    general     teacher-forced teacher KL on held-out text of each kind of ``bundled:general``
                (prose, documentation, code, worked maths): how general a copy the student is
    draft       as a speculative-decoding draft for the teacher: acceptance expected from
                held-out TVD, and measured by real decoding (:mod:`potstill.speculative`)
    size        parameters, bytes of the saved model, bytes of an exported GGUF
    speed       greedy decoding tokens/s on this machine, one prompt at a time and batched
    training    the run's own log: tokens, wall time, tokens/s
    harness     lm-evaluation-harness tasks, scored by the harness (:mod:`potstill.lmeval`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data.bundled import GENERAL_CHUNK_CHARS, GENERAL_KINDS

# What a measurement may need, and what provides it.
NEEDS = {
    "held_out": "a tokenised held-out set with supervised tokens",
    "teacher": "a teacher sharing the model's vocabulary (the model is not the teacher itself)",
    "bytes": "a fast tokenizer (the UTF-8 bytes of each vocabulary entry)",
    "prompts": "held-out records with a prompt (chat or prompt/completion), and generation on",
    "verifier": "held-out records carrying a reference `answer` (reasoning-gym tasks, or data "
    "with an `answer` field)",
    "draft": "a draft run (its log holds held-out acceptance), or speculative measuring asked",
    "model_dir": "a saved model directory",
    "speed": "speed measuring on",
    "training_log": "the run's metrics.jsonl",
    "harness": "lm-evaluation-harness tasks asked for (the lmeval extra)",
    "general": "a teacher sharing the vocabulary, and --general N (held-out bundled:general "
    "text of each kind)",
}


@dataclass(frozen=True)
class Metric:
    key: str  # its name in metrics dicts, JSON and logs
    header: str  # a table column
    words: str  # how a verdict names it
    better: str | None  # "lower" | "higher" | None: a fact about the model, not a score
    fmt: str  # how a value prints
    measurement: str  # the measurement that computes it (the module doc)
    verdict: bool = True  # weighed by verdicts (quality, not size, speed or cost)
    scale: float = 1.0  # printed as value × scale

    def show(self, value: Any) -> str:
        """The value formatted, "—" when absent or not finite."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "—"
        if self.key == "perplexity" and value >= 1e5:
            return f"{value:.2e}"  # a collapsed student
        return self.fmt.format(value * self.scale)

    @property
    def arrow(self) -> str:
        return {"lower": " ↓", "higher": " ↑"}.get(self.better or "", "")


def _m(key, header, words, better, fmt, measurement, verdict=True, scale=1.0) -> Metric:
    return Metric(key, header, words, better, fmt, measurement, verdict, scale)


# In the order tables show them and verdicts name them.
METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        _m("teacher_kl", "teacher KL", "held-out teacher KL", "lower", "{:.3f}", "held_out"),
        _m("teacher_reverse_kl", "reverse KL", "held-out reverse KL", "lower", "{:.3f}", "held_out"),
        _m("top1_agreement", "top-1 agreement", "top-1 agreement", "higher", "{:.1%}", "held_out"),
        _m("perplexity", "perplexity", "perplexity", "lower", "{:.2f}", "held_out"),
        _m("bits_per_byte", "bits per byte", "bits per byte", "lower", "{:.3f}", "held_out"),
        _m("task_accuracy_greedy", "accuracy greedy", "greedy task accuracy", "higher",
           "{:.1%}", "generation"),
        _m("task_accuracy_sampled", "accuracy T=1", "sampled task accuracy", "higher",
           "{:.1%}", "generation"),
        _m("own_reverse_kl", "reverse KL on own samples", "reverse KL on its own samples", "lower",
           "{:.3f}", "generation"),
        # diversity diagnoses collapse (near 0 / near 1) rather than ranks students: a random
        # model is the most diverse of all, so verdicts leave it out
        _m("own_distinct_2", "own distinct-2", "distinct-2 of its own samples", "higher",
           "{:.2f}", "generation", False),
        _m("own_repetition", "own repetition", "repetition in its own samples", "lower",
           "{:.2f}", "generation", False),
        _m("own_sample_tokens", "own sample tokens", "own sample length", None, "{:.0f}",
           "generation", False),
        # a general copy: the teacher KL on held-out text of other kinds (bundled:general);
        # the report words it as the share of the start's KL removed, not in verdicts
        _m("kl_prose", "prose KL", "teacher KL on held-out prose", "lower", "{:.3f}", "general",
           False),
        _m("kl_docs", "docs KL", "teacher KL on held-out documentation", "lower", "{:.3f}",
           "general", False),
        _m("kl_code", "code KL", "teacher KL on held-out code", "lower", "{:.3f}", "general",
           False),
        _m("kl_maths", "maths KL", "teacher KL on held-out worked maths", "lower", "{:.3f}",
           "general", False),
        _m("acceptance", "acceptance T=1", "expected draft acceptance", "higher", "{:.1%}",
           "draft"),
        _m("spec_tokens_per_pass_greedy", "tokens/pass greedy", "measured tokens per target pass",
           "higher", "{:.2f}", "draft"),
        _m("spec_speedup", "speculative speedup", "speculative speedup", "higher", "{:.2f}×",
           "draft", False),
        _m("parameters", "parameters", "parameters", None, "{:.1f}M", "size", False, 1e-6),
        _m("model_mb", "saved MB", "saved size", None, "{:.1f}", "size", False),
        _m("gguf_mb", "GGUF MB", "GGUF size", None, "{:.1f}", "size", False),
        _m("decode_tokens_per_s", "tokens/s batch 1", "decoding speed", "higher", "{:.1f}",
           "speed", False),
        _m("decode_tokens_per_s_batched", "tokens/s batched", "batched decoding speed", "higher",
           "{:.1f}", "speed", False),
        _m("train_tokens", "train tokens", "training tokens", None, "{:,.0f}", "training", False),
        _m("train_seconds", "train s", "training time", None, "{:.0f}", "training", False),
        _m("train_tokens_per_s", "train tokens/s", "training speed", None, "{:.0f}", "training",
           False),
    )
}  # fmt: skip

# The teacher measured against itself, by definition.
TEACHER_ITSELF = {"teacher_kl": 0.0, "teacher_reverse_kl": 0.0, "top1_agreement": 1.0}

# The groups a report card tables separately.
QUALITY = tuple(k for k, m in METRICS.items() if m.measurement in ("held_out", "generation"))
GENERAL = tuple(k for k, m in METRICS.items() if m.measurement == "general")
DRAFT = tuple(k for k, m in METRICS.items() if m.measurement == "draft")
COST = tuple(k for k, m in METRICS.items() if m.measurement in ("size", "speed", "training"))


# ----------------------------------------------------------------------------- tables, verdicts


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def present(rows: dict[str, dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The ``keys`` at least one row holds a finite value for, in the registry's order."""
    return [k for k in keys if any(_finite(r.get(k)) for r in rows.values())]


def table_cells(
    rows: dict[str, dict[str, Any]], keys: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """(header, body): a row per model and a column per metric of ``keys`` that any row has,
    "—" where a row lacks it; no cells when no row has any."""
    keys = present(rows, keys)
    if not keys:
        return [], []
    header = ["model", *(METRICS[k].header + METRICS[k].arrow for k in keys)]
    body = [[name, *(METRICS[k].show(row.get(k)) for k in keys)] for name, row in rows.items()]
    return header, body


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_lines(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, its first column left-aligned and the others right; none without rows."""
    if not body:
        return []
    return [markdown_row(header), "|---|" + "---:|" * (len(header) - 1), *map(markdown_row, body)]


def markdown_table(rows: dict[str, dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """:func:`table_cells` as Markdown lines."""
    return markdown_lines(*table_cells(rows, keys))


def verdict(name: str, run: dict[str, Any], other_name: str, other: dict[str, Any]) -> str:
    """One computed sentence comparing two models on the quality metrics both have (finite):
    where ``name`` is better, where worse, with the figures, e.g. "the KD student is better than
    the CE baseline on held-out teacher KL (1.790 vs 2.220) but worse on perplexity (20.10 vs
    18.30)". Values equal as printed are ties, named with their figures when there are at most
    two."""
    better, worse, tied = [], [], []
    for key, m in METRICS.items():
        a, b = run.get(key), other.get(key)
        if not (m.verdict and m.better and _finite(a) and _finite(b)):
            continue
        said = f"{m.words} ({m.show(a)} vs {m.show(b)})"
        if m.show(a) == m.show(b):
            tied.append((said, m.words))
        elif (a < b) == (m.better == "lower"):
            better.append(said)
        else:
            worse.append(said)
    if not (better or worse or tied):
        return f"{name} and {other_name} share no held-out metric"
    parts = []
    if better:
        parts.append(f"better than {other_name} on {_listed(better)}")
    if worse:
        parts.append(("but " if better else "") + f"worse on {_listed(worse)}")
    if tied:  # more than two ties: their names only
        listed = _listed([t[0] for t in tied] if len(tied) <= 2 else [t[1] for t in tied])
        parts.append(("and " if parts else "") + f"level on {listed}")
    if not better and worse:
        parts[0] = parts[0].replace("worse on", f"worse than {other_name} on", 1)
    return f"{name} is " + " ".join(parts)


def against_first(rows: dict[str, dict[str, Any]], keys: Sequence[str] | None = None) -> list[str]:
    """A verdict (a sentence, with its full stop) for each row after the first, against the
    first, weighing only ``keys`` when given."""
    (first, base), *rest = rows.items()
    pick = (lambda m: {k: m[k] for k in keys if k in m}) if keys else (lambda m: m)
    return [f"{verdict(name, pick(m), first, pick(base))}." for name, m in rest]


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- measuring


@dataclass
class Settings:
    """How much a report measures; the same for every model of one report."""

    generation: bool = True  # greedy and sampled completions of the held-out prompts
    prompts: int = 48  # held-out prompts completed (the first ones)
    max_new_tokens: int = 256
    seed: int = 0  # the sampled completions' seed (the same for every model)
    speed: bool = True
    speed_new_tokens: int = 32  # per prompt, greedy
    speed_batch: int = 8  # prompts decoded together for the batched figure
    general: int = 0  # held-out records of each kind of bundled:general text (0: not measured)
    speculative: bool = False  # every model also as a draft for the teacher
    gamma: int = 4  # drafted tokens per target pass
    draft_prompts: int = 4
    draft_new_tokens: int = 48
    harness_tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks (the lmeval extra)
    harness_include: str | None = None  # a folder of custom harness task YAMLs
    harness_limit: int | None = None  # documents per harness task (None: all)


@dataclass
class Context:
    """One model to measure and what there is to measure it with."""

    model: nn.Module
    tokenizer: Any
    settings: Settings
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)  # held-out, collated
    records: list[dict] = field(default_factory=list)  # the held-out records themselves
    teacher: nn.Module | None = None  # shares the vocabulary; None for the teacher's own row
    vocab_size: int | None = None  # rows of the shared vocabulary the losses compare
    autocast_dtype: torch.dtype | None = None
    byte_lengths: torch.Tensor | None = None
    model_dir: Path | None = None
    run_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the run's metrics.jsonl rows
    general: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)  # kind: batches
    speed_cache: Callable[[Callable[[], dict]], dict] | None = None  # see :func:`measure_speed`

    def has(self, need: str) -> bool:
        s = self.settings
        return {
            "held_out": bool(self.batches),
            "teacher": self.teacher is not None,
            "bytes": self.byte_lengths is not None,
            "prompts": s.generation and s.prompts > 0 and bool(prompt_records(self.records)),
            "verifier": any("answer" in r for r in prompt_records(self.records)),
            "draft": s.speculative or any("eval/acceptance" in h for h in self.history),
            "model_dir": self.model_dir is not None,
            "speed": s.speed,
            "training_log": bool(self.history),
            "harness": bool(s.harness_tasks),
            "general": bool(self.general),
        }[need]


def prompt_records(records: Sequence[dict]) -> list[dict]:
    """The records generation can start from: chat or prompt/completion, not plain text."""
    return [r for r in records if "messages" in r or "prompt" in r]


@dataclass(frozen=True)
class Measurement:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Context], dict[str, Any]]


def measure_held_out(c: Context) -> dict[str, Any]:
    from potstill.evaluate import evaluate

    out = evaluate(
        c.model,
        c.batches,
        teacher=c.teacher,
        vocab_size=c.vocab_size,
        autocast_dtype=c.autocast_dtype,
        byte_lengths=c.byte_lengths,
        progress=True,
        desc="held-out",
    )
    if c.teacher is None:  # the teacher's own row: its distance to itself is nil by definition
        out.pop("teacher_perplexity", None)
    return out


def measure_generation(c: Context) -> dict[str, Any]:
    """Greedy and T=1 completions of the first ``settings.prompts`` held-out prompts."""
    from potstill.evaluate import score_own_samples
    from potstill.generate import prompt_of
    from potstill.generation import SamplingParams
    from potstill.generation.hf import HFBackend
    from potstill.utils import pad_token_id

    s = c.settings
    records = prompt_records(c.records)[: s.prompts]
    backend = HFBackend(c.model, c.tokenizer, batch_size=16)
    asked = [
        backend.prompt_token_ids(prompt_of(r, where=f"held-out record {i}"))
        for i, r in enumerate(records)
    ]
    drawn = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        params = SamplingParams(
            temperature=temperature, max_new_tokens=s.max_new_tokens, seed=s.seed
        )
        print(f"  generating {len(asked)} {mode} completions …", flush=True)
        drawn[mode] = [rows[0] for rows in backend.generate_ids(asked, params)]
    out = score_own_samples(
        c.model,
        c.teacher,
        asked,
        drawn["sampled"],
        pad_token_id=pad_token_id(c.tokenizer),
        vocab_size=c.vocab_size,
        autocast_dtype=c.autocast_dtype,
        device=next(c.model.parameters()).device,
    )
    if c.has("verifier"):
        for mode, completions in drawn.items():
            texts = [c.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
            out[f"task_accuracy_{mode}"], out["task_prompts"] = task_accuracy(records, texts)
    return out


def general_batches(
    tokenizer, records: int, *, max_length: int, batch_size: int
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The first ``records`` held-out records of each kind of ``bundled:general``, collated."""
    from potstill.data.bundled import general_records
    from potstill.data.tokenize import tokenize_records
    from potstill.train import fixed_batches
    from potstill.utils import pad_token_id

    held = general_records("eval", chunk_chars=GENERAL_CHUNK_CHARS, limit=4 * records)
    out = {}
    for kind in GENERAL_KINDS:
        examples, _ = tokenize_records(
            [r for r in held if r["kind"] == kind], tokenizer, max_length=max_length
        )
        out[kind] = fixed_batches(examples, batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    return out


def measure_general(c: Context) -> dict[str, Any]:
    """The teacher KL on each kind of general text (nothing for the teacher's own row, which
    the report fills with zeros, or a model of another vocabulary)."""
    from potstill.evaluate import evaluate

    if c.teacher is None:
        return {}
    return {
        f"kl_{kind}": evaluate(
            c.model,
            batches,
            teacher=c.teacher,
            vocab_size=c.vocab_size,
            autocast_dtype=c.autocast_dtype,
            progress=True,
            desc=f"general: {kind}",
        )["teacher_kl"]
        for kind, batches in c.general.items()
    }


def removed(rows: dict[str, dict[str, Any]], keys: Sequence[str], start: str) -> list[str]:
    """For each row but ``start``'s and the teacher's: the share of the start's value of each
    of ``keys`` it removed, e.g. "KD removes 83% of the start's teacher KL on held-out prose"."""
    base = rows.get(start)
    if base is None:
        return []
    lines = []
    for name, row in rows.items():
        if name in (start, "teacher"):
            continue
        shares = [
            f"{1 - row[k] / base[k]:.0%} on {METRICS[k].words.removeprefix('teacher KL on ')}"
            for k in keys
            if _finite(row.get(k)) and _finite(base.get(k)) and base[k] > 0
        ]
        if shares:
            lines.append(f"{name} removes {_listed(shares)} of the teacher KL {start} had.")
    return lines


def task_accuracy(records: Sequence[dict], texts: Sequence[str]) -> tuple[float, int]:
    """(share of ``texts`` whose final answer :func:`potstill.verify.verify` finds correct for
    its record, how many records had an answer to check); NaN when none had."""
    from potstill.verify import reference_of, verify

    correct = [
        verify(text, **reference_of(r)).correct for r, text in zip(records, texts, strict=True)
    ]
    checked = [x for x in correct if x is not None]
    return (sum(checked) / len(checked) if checked else math.nan), len(checked)


def measure_draft(c: Context) -> dict[str, Any]:
    """The model as a speculative-decoding draft for the teacher: the expected acceptance and
    tokens per target pass, teacher-forced on the held-out set (method draft's held-out metrics),
    then real decoding of a few held-out prompts (:func:`potstill.speculative.measure`),
    prefixed ``spec_``."""
    from potstill.data import batch_prompts
    from potstill.methods.draft import Draft
    from potstill.methods.token_level import TokenLevel
    from potstill.speculative import measure
    from potstill.utils import pad_token_id

    s = c.settings
    expected = Draft(TokenLevel(vocab_size=c.vocab_size), gamma=s.gamma).evaluate(
        c.model, c.teacher, c.batches, c.tokenizer
    )
    prompts = [prompt for batch in c.batches for prompt in batch_prompts(batch)]
    measured = measure(
        c.teacher, c.model, prompts[: s.draft_prompts], gamma=s.gamma,
        max_new_tokens=s.draft_new_tokens, seed=s.seed, pad_token_id=pad_token_id(c.tokenizer),
    )  # fmt: skip
    return {**expected, "spec_gamma": s.gamma, **{f"spec_{k}": v for k, v in measured.items()}}


def measure_size(c: Context) -> dict[str, Any]:
    from potstill.models import count_parameters

    out: dict[str, Any] = {"parameters": count_parameters(c.model)}
    if c.model_dir is not None:
        out["model_mb"] = sum(f.stat().st_size for f in Path(c.model_dir).iterdir()) / 1e6
    ggufs = sorted(Path(c.run_dir).rglob("*.gguf")) if c.run_dir is not None else []
    if ggufs:
        out["gguf_mb"] = ggufs[0].stat().st_size / 1e6
        out["gguf_file"] = str(ggufs[0])
    return out


def measure_speed(c: Context) -> dict[str, Any]:
    """Greedy decoding tokens/s on this machine: ``speed_batch`` held-out prompts one at a time,
    then together, ``speed_new_tokens`` each, after a warm-up. Timings vary between runs, so a
    ``speed_cache`` (the report's) keeps the first measurement of a model for later reports."""

    def run() -> dict[str, Any]:
        from potstill.data import batch_prompts
        from potstill.generation import SamplingParams
        from potstill.generation.hf import HFBackend

        s = c.settings
        prompts = [p for batch in c.batches for p in batch_prompts(batch)][: s.speed_batch]
        params = SamplingParams(temperature=0.0, max_new_tokens=s.speed_new_tokens)
        one = HFBackend(c.model, c.tokenizer, batch_size=1)
        one.generate_ids(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4))
        start, tokens = time.perf_counter(), 0
        for prompt in prompts:
            tokens += sum(len(rows[0]) for rows in one.generate_ids([prompt], params))
        alone = tokens / (time.perf_counter() - start)
        many = HFBackend(c.model, c.tokenizer, batch_size=len(prompts))
        start = time.perf_counter()
        tokens = sum(len(rows[0]) for rows in many.generate_ids(prompts, params))
        together = tokens / (time.perf_counter() - start)
        return {
            "decode_tokens_per_s": alone,
            "decode_tokens_per_s_batched": together,
            "speed_batch": len(prompts),
        }

    return c.speed_cache(run) if c.speed_cache is not None else run()


def measure_training(c: Context) -> dict[str, Any]:
    """From the run's log: the last row's tokens and training wall time (logs written before
    the time was kept have only tokens/s)."""
    rows = [h for h in c.history if "tokens" in h]
    if not rows:
        return {}
    last = rows[-1]
    out = {"train_tokens": last["tokens"], "steps": last.get("step")}
    seconds = next((h["train_seconds"] for h in reversed(rows) if "train_seconds" in h), None)
    if seconds:
        out.update(train_seconds=seconds, train_tokens_per_s=last["tokens"] / seconds)
    return out


def measure_harness(c: Context) -> dict[str, Any]:
    """lm-evaluation-harness tasks (:func:`potstill.lmeval.harness`), under ``harness``:
    ``{task: {metric: value}}``, the harness's own scoring."""
    from potstill.lmeval import harness

    s = c.settings
    return {
        "harness": harness(
            c.model,
            c.tokenizer,
            list(s.harness_tasks),
            include_path=s.harness_include,
            limit=s.harness_limit,
            seed=s.seed,
        )
    }


MEASUREMENTS = (
    Measurement("held_out", ("held_out",), measure_held_out),
    Measurement("generation", ("prompts",), measure_generation),
    Measurement("general", ("general",), measure_general),
    Measurement("draft", ("held_out", "teacher", "draft"), measure_draft),
    Measurement("size", (), measure_size),
    Measurement("speed", ("held_out", "speed"), measure_speed),
    Measurement("training", ("training_log",), measure_training),
    Measurement("harness", ("harness",), measure_harness),
)


def measure(c: Context) -> dict[str, Any]:
    """Every measurement whose needs ``c`` meets, merged into one dict of metrics."""
    out: dict[str, Any] = {}
    for m in MEASUREMENTS:
        if all(c.has(need) for need in m.needs):
            out.update(m.run(c))
    return out
