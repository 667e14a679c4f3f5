"""``potstill evaluate``: students side by side on a recipe's held-out set, against its teacher.

The same metrics as the trainer's held-out evaluation (:mod:`potstill.evaluate`: teacher KL,
top-1 agreement, perplexity) for any number of saved students, on one tokenisation of one
held-out set, so students trained by different methods (token-level, sequence-level, CE) are
compared on equal terms. Writes a markdown report when asked.

With ``own_samples`` (the default for an ``on_policy`` recipe) each student also completes the
held-out prompts itself, sampled as the recipe's ``on_policy`` section says and with the same
seeds for every student, and the reverse KL to the teacher is measured on those samples: the
quantity on-policy distillation minimises, which teacher-forced metrics do not see.

With ``speculative`` each student is also judged as a speculative-decoding draft for the teacher:
expected acceptance from held-out TVD, then real decoding (:mod:`potstill.speculative`).

For a ``cross_tokenizer`` recipe (the teacher reads another vocabulary) the comparison is in bits
per byte of the held-out text, the teacher's on its own tokenisation of the same text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from potstill.errors import ModelLoadError, RecipeError
from potstill.evaluate import evaluate, token_byte_lengths
from potstill.metrics import (
    QUALITY,
    TEACHER_ITSELF,
    Context,
    Settings,
    against_first,
    markdown_table,
    measure_draft,
    measure_generation,
    prompt_records,
)
from potstill.models import (
    check_vocab_compatible,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from potstill.prepare import load_data
from potstill.recipe import Recipe
from potstill.train import fixed_batches
from potstill.utils import atomic_write, autocast_dtype, pad_token_id


def parse_students(specs: list[str]) -> dict[str, str]:
    """["NAME=MODEL", "MODEL", ...] -> {name: model}; a bare MODEL is named after itself.

    A model is any name :func:`potstill.models.load_model` takes: a saved student's folder, a
    .gguf file, ``bundled:NAME`` or a Hub id, so the untrained start can sit beside its students.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, _, model = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        try:
            resolve_model_path(model)
        except ModelLoadError as err:
            raise RecipeError(f"--student {spec}: {err}") from err
        out[name] = model
    return out


def compare_students(
    r: Recipe,
    students: dict[str, str],
    own_samples: bool | None = None,
    speculative: bool = False,
    prompts: int = 0,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Held-out metrics of the teacher and of every student (``{name: model}``, as
    :func:`parse_students` gives); with ``speculative``, each student also as a draft for the
    teacher (:func:`_as_draft`); with ``prompts``, each completes that many held-out prompts
    greedy and at T = 1, scored as the report card scores them
    (:func:`potstill.metrics.measure_generation`)."""
    from potstill.methods.on_policy import OnPolicy

    if own_samples is None:
        own_samples = r.method == "on_policy"
    if prompts < 0 or max_new_tokens < 1:
        raise RecipeError("--prompts must be 0 or more and --max-new-tokens 1 or more")
    if prompts and r.method == "cross_tokenizer":
        raise RecipeError(
            "--prompts is not measured for a cross_tokenizer recipe: leave it out, or answer "
            "the prompts with `potstill generate RECIPE generate.model=STUDENT`"
        )
    if not r.teacher.model:
        raise RecipeError("teacher.model is not set: the comparison is against the teacher")
    teacher = load_model(
        r.teacher.model, dtype=r.teacher.dtype, trust_remote_code=r.teacher.trust_remote_code
    )
    teacher_tokenizer = load_tokenizer(
        r.teacher.model, trust_remote_code=r.teacher.trust_remote_code
    )
    tokenizers = {name: load_tokenizer(path) for name, path in students.items()}
    tokenizer = next(iter(tokenizers.values()))  # the held-out set is tokenised once, by the first
    if r.method == "cross_tokenizer":
        return _compare_across_tokenizers(r, students, teacher, teacher_tokenizer, tokenizer)
    data = load_data(r, tokenizer, held_out_only=True)
    if prompts:
        asked = prompt_records(data.eval_records)[:prompts]
        if not asked:
            raise RecipeError(
                "--prompts: the held-out records have no prompts to complete (plain-text data); "
                "leave --prompts out"
            )
        if not any("answer" in x for x in asked):
            print("note: the held-out records carry no reference answer: no task accuracy")
        settings = Settings(prompts=prompts, max_new_tokens=max_new_tokens, seed=r.train.seed)
    batches = fixed_batches(
        data.eval, batch_size=r.train.batch_size, pad_id=pad_token_id(tokenizer)
    )
    rows: dict[str, Any] = {}
    for name, path in students.items():
        student = load_model(path)
        vocab_size = check_vocab_compatible(
            teacher_tokenizer,
            tokenizers[name],
            teacher_vocab_rows=teacher.get_output_embeddings().weight.shape[0],
            student_vocab_rows=student.get_output_embeddings().weight.shape[0],
        )
        metrics = evaluate(
            student,
            batches,
            teacher=teacher,
            vocab_size=vocab_size,
            autocast_dtype=autocast_dtype(r.train.precision),
            progress=True,
            desc=name,
        )
        if own_samples:  # a fresh sampler per student, the same seeds for all
            sampling = OnPolicy.from_recipe(r, vocab_size=vocab_size)
            sampling.eval_samples = True
            metrics.update(sampling.evaluate(student, teacher, batches, tokenizers[name]))
        if speculative:
            metrics.update(_as_draft(r, student, teacher, batches, tokenizer, vocab_size))
        if prompts:
            context = Context(
                model=student, tokenizer=tokenizers[name], settings=settings,
                records=data.eval_records, teacher=teacher, vocab_size=vocab_size,
                autocast_dtype=autocast_dtype(r.train.precision),
            )  # fmt: skip
            generated = measure_generation(context)  # task accuracy, own-sample figures
            # with --own-samples, the own-sample figures are those of the recipe's sampling
            metrics.update(
                {k: v for k, v in generated.items() if not (own_samples and k in metrics)}
            )
        rows[name] = {"model_dir": path, "parameters": count_parameters(student), **metrics}
        del student
    teacher_ppl = next(iter(rows.values()))["teacher_perplexity"]
    return _result(r, teacher, data, rows, perplexity=teacher_ppl)


def _as_draft(r: Recipe, student, teacher, batches, tokenizer, vocab_size) -> dict:
    """The student as a draft for the teacher (:func:`potstill.metrics.measure_draft`), with the
    recipe's ``draft`` settings."""
    d = r.draft
    settings = Settings(
        gamma=d.gamma,
        draft_prompts=d.eval_prompts,
        draft_new_tokens=d.eval_new_tokens,
        seed=r.train.seed,
    )
    return measure_draft(
        Context(
            model=student,
            tokenizer=tokenizer,
            settings=settings,
            batches=batches,
            teacher=teacher,
            vocab_size=vocab_size,
        )
    )


def _compare_across_tokenizers(r, students, teacher, teacher_tokenizer, tokenizer):
    from potstill.methods import build_method

    method = build_method(r, vocab_size=None)
    method.bind(tokenizer, teacher_tokenizer)
    data = load_data(r, tokenizer, method, held_out_only=True)
    batches = fixed_batches(
        data.eval, batch_size=r.train.batch_size, pad_id=pad_token_id(tokenizer)
    )
    rows: dict[str, Any] = {}
    for name, path in students.items():
        student = load_model(path)
        metrics = evaluate(
            student,
            batches,
            byte_lengths=token_byte_lengths(tokenizer),
            autocast_dtype=autocast_dtype(r.train.precision),
            progress=True,
            desc=name,
        )
        rows[name] = {"model_dir": path, "parameters": count_parameters(student), **metrics}
        del student
    teacher_bpb = method.evaluate(None, teacher, batches, tokenizer)["teacher_bits_per_byte"]
    return _result(r, teacher, data, rows, bits_per_byte=teacher_bpb)


def _verdicts(students: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """A computed verdict for each student after the first, against the first."""
    said = [f"- {sentence}" for sentence in against_first(students, keys)]
    return ["", *said] if said else []


def _result(r: Recipe, teacher, data, rows: dict[str, Any], **teacher_metric: float) -> dict:
    return {
        "teacher": {
            "model": r.teacher.model,
            "parameters": count_parameters(teacher),
            **teacher_metric,
        },
        "eval": {
            "source": r.data.eval or r.data.train,
            "examples": len(data.eval),
            "tokens": int(next(iter(rows.values()))["eval_tokens"]),
        },
        "students": rows,
    }


def report_markdown(result: dict[str, Any]) -> str:
    """The teacher and every student in one table of the registry's quality metrics (those any
    of them has), a verdict for each student after the first, and the drafts' table."""
    e, t = result["eval"], result["teacher"]
    across = "bits_per_byte" in t  # students of another tokenizer: only bits per byte compares
    students = result["students"].values()
    shown = {k: v for k, v in TEACHER_ITSELF.items() if any(k in m for m in students)}
    teacher = t if across else {**shown, **t}
    rows = {f"teacher ({t['model']})": teacher, **result["students"]}
    if across:
        intro = (
            f"Held-out: {e['examples']} examples, {e['tokens']:,} student tokens from "
            f"{e['source']}; the teacher reads the same text with its own tokenizer (perplexity "
            "is per student token)."
        )
        keys: tuple[str, ...] = ("parameters", "bits_per_byte", "perplexity")
    else:
        intro = f"Held-out: {e['examples']} examples, {e['tokens']:,} supervised tokens from {e['source']}."
        keys = ("parameters", *QUALITY)
    lines = [intro, "", *markdown_table(rows, keys)]
    lines += _verdicts(result["students"], keys=("bits_per_byte",) if across else None)
    if all("spec_speedup" in m for m in result["students"].values()):
        lines += ["", *_speculative_table(result["students"])]
    return "\n".join(lines) + "\n"


def _speculative_table(rows: dict[str, Any]) -> list[str]:
    """Each student as a draft: expected (teacher-forced) and measured (real decoding)."""
    gamma = next(iter(rows.values()))["spec_gamma"]
    lines = [
        f"As speculative-decoding drafts (γ = {gamma}; tokens per target pass, expected from "
        "held-out acceptance and measured in real decoding; tokens/s at greedy):",
        "",
        "| draft | acceptance T=1 | acceptance greedy | expected tokens/pass T=1 "
        "| expected greedy | measured T=1 | measured greedy | target tokens/s "
        "| with draft | speedup | identical greedy output | draft cost / target cost "
        "| predicted speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['acceptance']:.1%} | {m['acceptance_greedy']:.1%} "
            f"| {m[f'tokens_per_pass_g{gamma}']:.2f} | {m[f'tokens_per_pass_greedy_g{gamma}']:.2f} "
            f"| {m['spec_tokens_per_pass_t1']:.2f} | {m['spec_tokens_per_pass_greedy']:.2f} "
            f"| {m['spec_target_tokens_per_s']:.1f} | {m['spec_speculative_tokens_per_s']:.1f} "
            f"| {m['spec_speedup']:.2f}× | {m['spec_identical_outputs']:.0%} "
            f"| {m['spec_cost_ratio']:.2f} | {m['spec_predicted_speedup']:.2f}× |"
        )
    return [
        *lines,
        "",
        "Predicted speedup = measured greedy tokens per pass / (γ × draft cost + 1): a target "
        "pass over γ + 1 tokens costed as one token (the optimistic end). Greedy outputs of a "
        "lossless decoder are identical; a difference is a near-tie that batched and single-token "
        "passes round differently.",
    ]


def run_compare(
    r: Recipe,
    specs: list[str],
    report: str | None,
    own_samples: bool | None = None,
    speculative: bool = False,
    prompts: int = 0,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    result = compare_students(
        r, parse_students(specs), own_samples, speculative, prompts, max_new_tokens
    )
    text = report_markdown(result)
    print(text)
    if report:
        atomic_write(Path(report), text)
        atomic_write(Path(report).with_suffix(".json"), json.dumps(result, indent=2))
        print(f"report: {report}")
    return result
