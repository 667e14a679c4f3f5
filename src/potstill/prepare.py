"""Everything a run needs before its first step: models, preflight, tokenized data.

``potstill check`` runs :func:`preflight` (tokenizers and configs only, no weights);
``potstill train`` and the demo run :func:`load_models` and :func:`load_data`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from potstill import students
from potstill.bundled_models import gguf_parsed_once
from potstill.data import Example, TokenizeStats, load_records, tokenize_records
from potstill.errors import DataError, ModelLoadError, RecipeError
from potstill.methods.registry import MethodInfo, method_info
from potstill.models import (
    check_vocab_compatible,
    count_parameters,
    load_config,
    load_model,
    load_tokenizer,
    prune_layers,
    student_from_config,
    validate_keep,
)
from potstill.recipe import Recipe

if TYPE_CHECKING:
    from potstill.methods.base import Method


@dataclass
class Models:
    student: nn.Module
    tokenizer: Any  # the student's tokenizer (shared with the teacher for token-level KD)
    teacher: nn.Module | None
    vocab_size: int | None  # shared real vocabulary the logits are compared over
    teacher_tokenizer: Any = None  # loaded when the method compares different vocabularies


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats
    eval_records: list[dict] = dataclasses.field(default_factory=list)  # before tokenisation


def _student_source(r: Recipe) -> str:
    return r.student.model or r.teacher.model  # validated by recipe.validate


def preflight(r: Recipe) -> dict[str, Any]:
    """Cheap checks with tokenizers and configs only; raises with a message that names the fix."""
    report: dict[str, Any] = {}
    source = _student_source(r)
    student_tok = load_tokenizer(source, trust_remote_code=r.student.trust_remote_code)
    report["student_tokenizer"] = f"{source} ({len(student_tok):,} tokens)"
    if r.student.init == "prune":  # the layers exist: the config says how many there are
        config = load_config(source, trust_remote_code=r.student.trust_remote_code)
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None:
            try:
                validate_keep(r.student.keep_layers, layers)
            except ModelLoadError as e:
                raise RecipeError(f"`student.keep_layers`: {e}") from None
            report["pruned_student"] = f"{len(r.student.keep_layers)} of {layers} layers"
    if r.teacher.source == "cache":
        manifest = _cache_manifest(r, student_tok)
        report["teacher_cache"] = (
            f"{r.teacher.cache}: top-{manifest['top_k']} {manifest['dtype']} log-probabilities of "
            f"{manifest['teacher']['model']}, "
            + ", ".join(
                f"{split} {entry['positions']:,} positions"
                for split, entry in manifest["splits"].items()
            )
            + f", {manifest['bytes_per_position']:.1f} bytes/position"
        )
        return report
    if r.teacher.source == "server":
        report["teacher_server"] = _probe_server(r.teacher.server_url, r.teacher.model)
    if r.teacher.model and _method(r).needs_teacher:
        teacher_tok = load_tokenizer(r.teacher.model, trust_remote_code=r.teacher.trust_remote_code)
        if not _method(r).shared_vocabulary:
            from potstill.data.alignment import shared_vocab

            shared = len(shared_vocab(student_tok, teacher_tok)[0])
            report["teacher_tokenizer"] = f"{r.teacher.model} ({len(teacher_tok):,} tokens)"
            report["entries_spelled_alike"] = f"{shared:,}"
            return report
        teacher_rows = load_config(
            r.teacher.model, trust_remote_code=r.teacher.trust_remote_code
        ).vocab_size
        student_rows = load_config(source, trust_remote_code=r.student.trust_remote_code).vocab_size
        if r.student.init == "config":
            student_rows = r.student.config_overrides.get("vocab_size", student_rows)
        report["shared_vocab"] = check_vocab_compatible(
            teacher_tok,
            student_tok,
            teacher_vocab_rows=teacher_rows,
            student_vocab_rows=student_rows,
        )
    return report


def _method(r: Recipe) -> MethodInfo:
    return method_info(r.method)


def loads_teacher(r: Recipe) -> bool:
    """Whether a run loads the teacher model: its method needs one, and the signal is live."""
    return _method(r).needs_teacher and r.teacher.source == "live"


def _probe_server(url: str, model: str) -> str:
    """``GET {url}/models``: the served teacher answers and lists ``model``, or a GenerationError
    that names the URL and what to do."""
    import httpx

    from potstill.errors import GenerationError

    try:
        response = httpx.get(url.rstrip("/") + "/models", timeout=10)
        response.raise_for_status()
        names = [m.get("id") for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as err:
        raise GenerationError(
            f"the teacher server at {url} does not answer GET /models ({type(err).__name__}); "
            "start it (e.g. `potstill serve MODEL`) or fix teacher.server_url"
        ) from None
    if names and model not in names:
        raise GenerationError(
            f"the teacher server at {url} serves {', '.join(map(str, names))}, not "
            f"teacher.model={model!r}; set teacher.model to the served name"
        )
    return f"{url} serves {model}"


def _cache_manifest(r: Recipe, tokenizer: Any) -> dict[str, Any]:
    """The teacher cache's manifest, checked against the recipe (teacher.source: cache)."""
    from potstill.teachers.cache import check_manifest, read_manifest

    manifest = read_manifest(r.teacher.cache)
    check_manifest(
        manifest,
        r.teacher.cache,
        teacher_model=r.teacher.model,
        tokenizer=tokenizer,
        max_length=r.data.max_length,
        packing=r.data.packing,
        temperature=r.loss.kd_temperature,
    )
    return manifest


def load_models(r: Recipe, *, teacher: nn.Module | None = None) -> Models:
    """Teacher (unless the method needs none) and the initialised student, with preflight.

    ``teacher`` may be passed in to share one loaded teacher between runs (the demo does).
    A ``.gguf`` model's metadata is parsed once for its config, weights and tokenizer.
    """
    with gguf_parsed_once():
        return _load_models(r, teacher)


def _load_models(r: Recipe, teacher: nn.Module | None) -> Models:
    needs_teacher = loads_teacher(r)
    encoder = _method(r).encoder  # sentence encoders load as bare encoders (no LM head)
    if teacher is None and r.teacher.model and needs_teacher:
        teacher = load_model(
            r.teacher.model, dtype=r.teacher.dtype, trust_remote_code=r.teacher.trust_remote_code,
            encoder=encoder, allow_pickle=r.teacher.allow_pickle,
        )  # fmt: skip
    source = _student_source(r)
    s = r.student
    load = functools.partial(
        load_model, dtype=s.dtype, trust_remote_code=s.trust_remote_code, encoder=encoder,
        allow_pickle=s.allow_pickle,
    )  # fmt: skip
    if s.init == "pretrained":
        student = load(source)
    elif s.init == "prune":
        full = load(source)
        student = prune_layers(full, s.keep_layers)
        del full
    elif encoder:
        raise RecipeError(
            f"method {r.method} starts its student from a model (student.init: pretrained or "
            "prune), not from a config"
        )
    else:  # a random init drawn from train.seed, whatever the global RNG holds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.train.seed)
            student = student_from_config(source, s.config_overrides)
    # LoRA adapters / the QAT grid, before anything reads the weights
    students.prepare(student, s, r.train.seed)
    tokenizer = load_tokenizer(source, trust_remote_code=s.trust_remote_code)
    vocab_size = None
    teacher_tok = None
    if teacher is not None:
        teacher_tok = load_tokenizer(r.teacher.model, trust_remote_code=r.teacher.trust_remote_code)
    if r.teacher.source == "cache":  # the manifest vouches for the tokenizer; no teacher here
        vocab_size = _cache_manifest(r, tokenizer)["vocab_size"]
    if r.teacher.source == "server":  # the served model's tokenizer and config, no weights
        vocab_size = check_vocab_compatible(
            load_tokenizer(r.teacher.model, trust_remote_code=r.teacher.trust_remote_code),
            tokenizer,
            teacher_vocab_rows=load_config(
                r.teacher.model, trust_remote_code=r.teacher.trust_remote_code
            ).vocab_size,
            student_vocab_rows=student.get_output_embeddings().weight.shape[0],
        )
    if teacher is not None and encoder:  # one tokenizer: the same ids mean the same pieces
        vocab_size = check_vocab_compatible(
            teacher_tok,
            tokenizer,
            teacher_vocab_rows=teacher.config.vocab_size,
            student_vocab_rows=student.config.vocab_size,
        )
    elif teacher is not None and _method(r).shared_vocabulary:
        vocab_size = check_vocab_compatible(
            teacher_tok,
            tokenizer,
            teacher_vocab_rows=teacher.get_output_embeddings().weight.shape[0],
            student_vocab_rows=student.get_output_embeddings().weight.shape[0],
        )
    print(
        f"student: {count_parameters(student) / 1e6:.1f}M parameters ({s.init} from {source})"
        + students.describe(student)
        + (
            f"; teacher: {count_parameters(teacher) / 1e6:.1f}M ({r.teacher.model})"
            if teacher is not None
            else ""
        )
    )
    if s.keep_layers and s.init != "prune":
        print(
            f"note: student.keep_layers {list(s.keep_layers)} is not used: the student is "
            f"student.init: {s.init} (student.init=prune prunes to those layers)"
        )
    return Models(
        student=student,
        tokenizer=tokenizer,
        teacher=teacher if needs_teacher else None,
        vocab_size=vocab_size,
        teacher_tokenizer=teacher_tok,
    )


def load_data(
    r: Recipe, tokenizer: Any, method: Method | None = None, *, held_out_only: bool = False
) -> Data:
    """Read and tokenize the train and held-out sets; prints the truncation report.

    A ``method`` that ``encodes_records`` tokenizes records through its ``example`` hook (e.g.
    cross_tokenizer: both tokenizers and their alignment). ``held_out_only`` (measuring, not
    training): the held-out set alone; the training records are read only where it is drawn
    from them, and never tokenized.
    """
    d = r.data
    separate = bool(d.eval) or d.train.startswith("bundled:")  # a held-out source or split
    train_records = []
    if not (held_out_only and separate):
        train_records = load_records(d.train, split=d.train_split, limit=d.max_train_records)
    if separate:
        eval_source = d.eval or d.train
        eval_records = load_records(eval_source, split=d.eval_split, limit=d.max_eval_records)
    else:  # hold out a seeded sample of the training records
        eval_source = f"{d.train} (held-out sample)"
        eval_records, train_records = hold_out(
            train_records, d.max_eval_records or 200, seed=r.train.seed
        )
    encode = method.example if method is not None and method.encodes_records else None

    def tokenize(records: list[dict], packing: bool) -> tuple[list[Example], TokenizeStats]:
        return tokenize_records(
            records,
            tokenizer,
            max_length=d.max_length,
            packing=packing,
            progress=encode is not None,  # e.g. two tokenizers and an alignment per record
            encode=encode,
        )

    held, eval_stats = tokenize(eval_records, False)
    eval_summary = f"eval data ({eval_source}): {eval_stats.summary()}"
    if held_out_only:
        print(eval_summary)
        return Data([], held, TokenizeStats(), eval_stats, eval_records)
    train, train_stats = tokenize(train_records, d.packing)
    if not train:  # an empty stream would spin for ever looking for a batch
        raise DataError(
            f"no training record of {d.train} keeps a target token within "
            f"data.max_length={d.max_length} ({train_stats.dropped:,} dropped: prompts as long as "
            "that); raise data.max_length or shorten the prompts"
        )
    if r.teacher.source == "cache":  # the cache's rows are found by example index
        from potstill.teachers.cache import check_split, read_manifest

        manifest = read_manifest(r.teacher.cache)
        check_split(manifest, r.teacher.cache, "train", train)
        check_split(manifest, r.teacher.cache, "eval", held)
        train, held = with_example_index(train), with_example_index(held)
    print(f"train data ({d.train}): {train_stats.summary()}")
    print(eval_summary)
    return Data(
        train=train,
        eval=held,
        train_stats=train_stats,
        eval_stats=eval_stats,
        eval_records=eval_records,
    )


def with_example_index(examples: list[Example]) -> list[Example]:
    """The examples, each carrying its index (collated as ``batch["example_index"]`` (B, 1))."""
    return [
        dataclasses.replace(e, extra={**(e.extra or {}), "example_index": [i]})
        for i, e in enumerate(examples)
    ]


def hold_out(records: list[dict], n: int, *, seed: int) -> tuple[list[dict], list[dict]]:
    """(held-out, rest): ``n`` records drawn with a fixed seed, at most a fifth of the data."""
    n = min(n, len(records) // 5)
    if n == 0:
        raise DataError(
            f"{len(records)} records are too few to hold any out; set `data.eval` to a held-out source"
        )
    order = random.Random(seed).sample(range(len(records)), len(records))
    held = set(order[:n])
    return [records[i] for i in sorted(held)], [
        rec for i, rec in enumerate(records) if i not in held
    ]
