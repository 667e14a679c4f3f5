"""Load training records from local files, `datasets` folders, bundled sources or the Hub.

A record is a plain dict in one of three shapes (extra keys such as `answer` are kept):

    {"text": "..."}                                     # plain language modelling
    {"prompt": ..., "completion": ...}                  # strings, or both lists of messages
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}

`load_records` returns a list of such dicts, validated one by one, so a bad record fails here with
its file and line rather than deep inside tokenisation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from potstill.data.bundled import EVAL_SPLITS, load_bundled
from potstill.errors import DataError

RecordFormat = Literal["text", "prompt_completion", "messages"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Split names that mean "held-out data"; a request for one may be served by another.


# ---------------------------------------------------------------------------------------------
# record shapes


def record_format(rec: Any) -> RecordFormat:
    """Validate one record and return its shape; raise DataError naming the keys found."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object / dict, got {type(rec).__name__}")
    shapes = [
        name
        for name, keys in (
            ("text", ("text",)),
            ("prompt_completion", ("prompt", "completion")),
            ("messages", ("messages",)),
        )
        if any(k in rec for k in keys)
    ]
    found = f"keys found: {sorted(rec)}"
    if not shapes:
        raise DataError(
            f"record has none of 'text', 'prompt'+'completion' or 'messages' ({found}); "
            "rename its fields to one of these shapes"
        )
    if len(shapes) > 1:
        raise DataError(
            f"record mixes shapes {shapes} ({found}); keep one and rename the others "
            "(e.g. into 'metadata')"
        )
    shape = shapes[0]
    if shape == "text":
        _require_str(rec["text"], "text", found)
    elif shape == "prompt_completion":
        _check_prompt_completion(rec, found)
    else:
        _check_messages(rec["messages"], "messages", found)
        if not any(m["role"] == "assistant" for m in rec["messages"]):
            raise DataError(
                f"'messages' has no assistant message, so there is nothing to learn ({found}); "
                "add the assistant reply or drop the record"
            )
    return shape


def _require_str(value: Any, key: str, found: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, got {type(value).__name__} ({found})")


def _check_prompt_completion(rec: dict, found: str) -> None:
    for key in ("prompt", "completion"):
        if key not in rec:
            raise DataError(f"record has 'prompt' or 'completion' but not both ({found})")
    prompt, completion = rec["prompt"], rec["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return
    if isinstance(prompt, list) and isinstance(completion, list):
        _check_messages(prompt, "prompt", found)
        _check_messages(completion, "completion", found)
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"'completion' has no assistant message ({found})")
        return
    raise DataError(
        f"'prompt' and 'completion' must both be strings or both be lists of messages, got "
        f"{type(prompt).__name__} and {type(completion).__name__} ({found})"
    )


def _check_messages(messages: Any, key: str, found: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'{key}' must be a non-empty list of messages ({found})")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise DataError(f"'{key}'[{i}] must be a dict with a string 'role' ({found})")
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"'{key}'[{i}] (role {m['role']!r}) needs a string 'content', got "
                f"{type(m.get('content')).__name__} ({found})"
            )


# ---------------------------------------------------------------------------------------------
# sources


def load_records(
    source: str, *, split: str = "train", limit: int | None = None, validate: bool = True
) -> list[dict]:
    """Load and validate records from `source`.

    source: a .jsonl/.json/.csv/.parquet file; a folder written by `datasets.save_to_disk`; a
    folder of data files (files named after splits, e.g. `train.jsonl`, are picked by `split`);
    `bundled:NAME` (see `potstill.data.bundled`); or a Hugging Face Hub dataset id.
    limit: keep only the first `limit` records.
    validate: check each record's shape (off for prompt-only records, e.g. `potstill generate`'s
    prompts, which are checked by their own reader).
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records, got {limit}")
    if source.startswith("bundled:"):
        records = load_bundled(source.removeprefix("bundled:"), split=split, limit=limit)
        locate = _numbered(f"{source} record")
    else:
        path = Path(source).expanduser()
        if path.exists():
            records, locate = _load_local(path, split=split, limit=limit)
        elif _looks_like_path(source):
            raise DataError(f"no such file or folder: {source}; check the path")
        else:
            records = _load_hub(source, split=split, limit=limit)
            locate = _numbered(f"{source}[{split}] record")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{source} (split {split!r}) has no records; point at a non-empty source")
    for i, rec in enumerate(records if validate else ()):
        try:
            record_format(rec)
        except DataError as e:
            raise DataError(f"{locate(i)}: {e}") from None
    return records


def _looks_like_path(source: str) -> bool:
    """True for strings a user meant as a local path (so a typo is not sent to the Hub)."""
    if source.startswith((".", "/", "~")) or source.endswith(DATA_SUFFIXES):
        return True
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source)
    return hub_id is None


def _numbered(prefix: str, start: int = 0) -> Callable[[int], str]:
    """Where record i came from, for error messages: "data.csv data row 3"."""
    return lambda i: f"{prefix} {i + start}"


def _load_local(path: Path, *, split: str, limit: int | None) -> tuple[list[dict], Callable]:
    if path.is_file():
        return _load_file(path, limit=limit)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _load_saved_dataset(path, split=split), _numbered(f"{path} record")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise DataError(
            f"{path} holds no {'/'.join(DATA_SUFFIXES)} files and is not a `save_to_disk` folder"
        )
    files = _files_for_split(files, split=split, folder=path)
    records: list[dict] = []
    where: list[tuple[int, Callable]] = []  # (first record index, locate) per file
    for f in files:
        recs, loc = _load_file(f, limit=None if limit is None else limit - len(records))
        where.append((len(records), loc))
        records.extend(recs)
        if limit is not None and len(records) >= limit:
            break

    def locate(i: int) -> str:
        start, loc = max((w for w in where if w[0] <= i), key=lambda w: w[0])
        return loc(i - start)

    return records, locate


def _files_for_split(files: list[Path], *, split: str, folder: Path) -> list[Path]:
    """Files named after splits (train.jsonl, test.parquet, ...) are picked by split; else all."""
    stems = [f.name.split(".")[0].lower() for f in files]  # "train.part1.jsonl" -> "train"
    if not any(s in ("train", *EVAL_SPLITS) for s in stems):
        return files
    for wanted in _split_candidates(split):
        chosen = [f for f, s in zip(files, stems, strict=True) if s == wanted]
        if chosen:
            return chosen
    names = sorted(set(stems))
    raise DataError(f"{folder} has files for splits {names} but none for split {split!r}")


def _split_candidates(split: str) -> list[str]:
    """The requested split first, then its synonyms ('eval' may be served by 'validation')."""
    split = split.lower()
    return [split, *(s for s in EVAL_SPLITS if s != split)] if split in EVAL_SPLITS else [split]


def _load_file(path: Path, *, limit: int | None) -> tuple[list[dict], Callable]:
    suffix = path.suffix.lower()
    rows = _numbered(f"{path} data row", start=1)
    if suffix in (".jsonl", ".json"):
        return _load_json(path, limit=limit)
    if suffix == ".csv":
        import pandas as pd

        # keep_default_na=False: an empty cell is "", not NaN; CSV has no types, so all are str.
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=limit)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not readable as CSV ({e}); fix the file") from None
        return frame.to_dict(orient="records"), rows
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:
            raise DataError(
                f"{path}: not readable as Parquet ({e}); fix or rewrite the file"
            ) from None
        if limit is not None:
            table = table.slice(0, limit)
        return table.to_pylist(), rows
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}"
    )


def _load_json(path: Path, *, limit: int | None) -> tuple[list[dict], Callable]:
    """JSONL (one object per line, blank lines skipped), or a .json file holding one list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix that line") from None
        return records[:limit], _numbered(f"{path} list item")
    records, line_numbers = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{n}: invalid JSON ({e.msg}); fix or delete that line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}:{n}: expected one JSON object per line, got {type(obj).__name__}"
            )
        records.append(obj)
        line_numbers.append(n)
        if limit is not None and len(records) >= limit:
            break
    return records, lambda i: f"{path}:{line_numbers[i]}"


def _load_saved_dataset(path: Path, *, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = next((s for s in _split_candidates(split) if s in ds), None)
        if name is None:
            raise DataError(f"{path} has splits {list(ds)} but not {split!r}; pick one of those")
        ds = ds[name]
    return ds.to_list()


def _load_hub(source: str, *, split: str, limit: int | None) -> list[dict]:
    """A Hugging Face Hub dataset id (needs network access or a warm `datasets` cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # the Hub raises many types; all mean "could not load"
        raise DataError(
            f"{source!r} is neither a local path nor a reachable Hub dataset "
            f"({type(e).__name__}: {e}); check the path, the dataset id and split {split!r}, "
            "or use a bundled:NAME source offline"
        ) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()
