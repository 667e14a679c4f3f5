"""The teacher cache: the teacher's top-k next-token log-probabilities at every supervised
position of a recipe's data, written once, read by training with no teacher model loaded.

This module is the format and its reader (torch and safetensors only; other trainers can read a
cache with it); :mod:`potstill.teachers.writer` writes one. On disk (format 1;
``docs/teacher-cache.md`` is the reference):

    CACHE/
      manifest.json                 written last: its presence marks a complete cache
      train-00000.safetensors ...   shards of consecutive examples
      eval-00000.safetensors ...
      train.ledger.jsonl            one line per finished shard (what a resumed writer skips)

A shard holds ``ids`` (P, k) — uint16 where the vocabulary fits, else int32 — ``logprobs``
(P, k) float16 | bfloat16 | float32 at the capture temperature, and ``offsets`` (R+1,) int64:
example ``start + r`` owns rows ``offsets[r]:offsets[r+1]``, its supervised positions in order
(row-major, the order of ``labels != -100``). A cache written with a mass-coverage rule
(``coverage`` in the manifest) keeps k_i ≤ k entries at position i: its ``ids`` and ``logprobs``
are flat (E,), row after row, and ``counts`` (P,) uint8 | int16 holds each k_i; reading pads
rows to the batch's largest k_i (:func:`pad_rows`). A cache written with ``tail_samples`` = m
also holds ``tail`` (P, m) — tokens drawn from the teacher's distribution outside the entries
kept at each position — and ``tail_entropy`` (P,), that distribution's entropy (forward KL's tail,
:func:`potstill.losses.rows.tail_term`). The "other" event's mass 1 − Σ exp(logprobs) is derived
when reading. Every shard's SHA-256 is in the manifest (and the ledger) and is checked when
the shard is first read; the manifest also fingerprints the teacher, its tokenizer and chat
template, the tokenized data and the settings, so a cache is never used for data it was not
written for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from potstill.data import Example
from potstill.errors import DataError

FORMAT = "potstill-teacher-cache"
VERSION = 2  # 2: ragged shards (``counts``); version 1 caches (fixed k) read unchanged
READABLE = (1, 2)
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPLITS = ("train", "eval")


# ----------------------------------------------------------------------------- fingerprints


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 of the tokenized examples (ids and supervision masks, in order)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(len(e.input_ids).to_bytes(4, "little"))
        digest.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(bytes(bytearray(int(m) for m in e.target_mask)))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """SHA-256 of the token → id map and of the chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def supervised_counts(examples: Sequence[Example]) -> list[int]:
    """Scored positions per example: targets that have a previous token (labels are shifted)."""
    return [sum(e.target_mask[1:]) for e in examples]


# ----------------------------------------------------------------------------- reading


class CacheError(DataError):
    """A teacher cache that cannot serve this run; the message names the field or shard."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        partial = any(folder.glob("*.ledger.jsonl")) if folder.is_dir() else False
        raise CacheError(
            f"no complete teacher cache at {folder}: "
            + (
                "it was not finished; run the same `potstill cache` command again to finish it"
                if partial
                else "write one with `potstill cache RECIPE` (teacher.cache names the folder)"
            )
        )
    data = json.loads(manifest.read_text())
    if data.get("format") != FORMAT or data.get("version") not in READABLE:
        raise CacheError(
            f"{manifest}: not a {FORMAT} manifest of version {' or '.join(map(str, READABLE))} "
            f"(format {data.get('format')!r}, version {data.get('version')!r})"
        )
    return data


def coverage_counts(logprobs: Tensor, coverage: float) -> Tensor:
    """Entries to keep per row: the fewest of the (descending) top-k whose probability mass
    reaches ``coverage``, at least 1 and at most k. (P, k) -> (P,) long"""
    mass = logprobs.float().exp().cumsum(-1)  # (P, k)
    return ((mass < coverage).sum(-1) + 1).clamp(max=logprobs.shape[-1])


def pad_rows(ids: Tensor, logprobs: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Ragged rows to a rectangle: row i's ``counts[i]`` entries, then absent ones — log-prob −inf
    and the row's first id again, which the sparse loss reads as no event
    (:func:`potstill.losses.rows.present_events`).

    ids, logprobs (E,) row after row, counts (P,) ≥ 1 -> (P, max k_i) long, (P, max k_i) fp32"""
    counts = counts.long()
    rows, width = counts.numel(), int(counts.max()) if counts.numel() else 1
    starts = counts.cumsum(0) - counts  # (P,) each row's first entry
    row = torch.arange(rows).repeat_interleave(counts)  # (E,)
    col = torch.arange(ids.numel()) - starts.repeat_interleave(counts)  # (E,)
    first = ids[starts].long() if rows else ids.new_zeros(0, dtype=torch.long)
    out_ids = first[:, None].repeat(1, width)  # (P, width)
    out_lp = torch.full((rows, width), float("-inf"))
    out_ids[row, col] = ids.long()
    out_lp[row, col] = logprobs.float()
    return out_ids, out_lp


class CacheReader:
    """Rows of one split of a cache, by example index; shards are verified on first read.

    ``rows(example_index, counts)`` -> ``(ids (P, k) long, logprobs (P, k) fp32)`` for a batch
    whose rows are examples ``example_index`` (B,) with ``counts`` (B,) supervised positions."""

    def __init__(self, folder: str | Path, split: str, manifest: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.manifest = manifest or read_manifest(folder)
        self.split = split
        self.shards = self.manifest["splits"][split]["shards"]
        self.ends = [s["end"] for s in self.shards]
        self.ragged = self.manifest.get("coverage") is not None  # per-position k (``counts``)
        self.tail_samples = self.manifest.get("tail_samples", 0)  # ``tail`` draws per position
        self.loaded: dict[int, dict[str, Tensor]] = {}

    def _shard(self, i: int) -> dict[str, Tensor]:
        if i not in self.loaded:
            entry = self.shards[i]
            path = self.folder / entry["file"]
            if not path.is_file():
                raise CacheError(f"teacher cache shard {path} is missing")
            if sha256_file(path) != entry["sha256"]:
                raise CacheError(
                    f"teacher cache shard {path} is corrupted (its SHA-256 differs from the "
                    "manifest's); write the cache again with `potstill cache`"
                )
            shard = load_file(str(path))
            if self.ragged:  # where each position's entries start: (P+1,)
                shard["entry_offsets"] = torch.cat(
                    [torch.zeros(1, dtype=torch.int64), shard["counts"].long().cumsum(0)]
                )
            self.loaded[i] = shard
        return self.loaded[i]

    def _example(self, shard: dict[str, Tensor], a: int, b: int) -> tuple[Tensor, ...]:
        """Rows ``a:b`` of a shard: (ids, logprobs) (b−a, k), or flat with their counts."""
        if not self.ragged:
            return shard["ids"][a:b].long(), shard["logprobs"][a:b].float()
        e0, e1 = int(shard["entry_offsets"][a]), int(shard["entry_offsets"][b])
        # widened here: concatenating float16 under CPU autocast fails
        ids, lps = shard["ids"][e0:e1].long(), shard["logprobs"][e0:e1].float()
        return ids, lps, shard["counts"][a:b].long()

    def _locate(self, example: int) -> int:
        for i, end in enumerate(self.ends):
            if example < end:
                return i
        raise CacheError(
            f"example {example} is beyond the {self.split} split of the teacher cache "
            f"({self.ends[-1] if self.ends else 0} examples)"
        )

    def rows(self, example_index: Sequence[int], counts: Sequence[int]) -> tuple[Tensor, Tensor]:
        parts = [self._example(shard, a, b) for shard, a, b in self._spans(example_index, counts)]
        if not parts:
            return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1)
        if self.ragged:
            return pad_rows(*(torch.cat(column) for column in zip(*parts, strict=True)))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def tail(self, example_index: Sequence[int], counts: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The same rows' tail draws and tail entropy: (P, m) long, (P,) fp32."""
        spans = list(self._spans(example_index, counts))
        draws = [shard["tail"][a:b].long() for shard, a, b in spans]
        entropy = [shard["tail_entropy"][a:b].float() for shard, a, b in spans]
        if not spans:
            return torch.zeros(0, self.tail_samples, dtype=torch.long), torch.zeros(0)
        return torch.cat(draws), torch.cat(entropy)

    def _spans(self, example_index: Sequence[int], counts: Sequence[int]):
        """(shard, first row, end row) of each example, its position count checked."""
        for example, count in zip(example_index, counts, strict=True):
            i = self._locate(int(example))
            shard = self._shard(i)
            r = int(example) - self.shards[i]["start"]
            a, b = int(shard["offsets"][r]), int(shard["offsets"][r + 1])
            if b - a != int(count):
                raise CacheError(
                    f"example {example} has {count} supervised positions but the teacher cache "
                    f"holds {b - a}: the data changed since the cache was written"
                )
            yield shard, a, b


def iter_rows(reader: CacheReader) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Every example of the split as ``(index, ids, logprobs)`` — (P, k) long and fp32, ragged
    rows padded (:func:`pad_rows`); for tools outside the loop."""
    for i, entry in enumerate(reader.shards):
        shard = reader._shard(i)
        for r in range(entry["end"] - entry["start"]):
            a, b = int(shard["offsets"][r]), int(shard["offsets"][r + 1])
            rows = reader._example(shard, a, b)
            yield entry["start"] + r, *(pad_rows(*rows) if reader.ragged else rows)


# ----------------------------------------------------------------------------- checks


def check_manifest(
    manifest: dict[str, Any],
    folder: str | Path,
    *,
    teacher_model: str | None,
    tokenizer: Any,
    max_length: int,
    packing: bool,
    temperature: float,
) -> None:
    """Refuse a cache written for another teacher, tokenizer, chat template, data shape or
    temperature, naming the field (the data itself is checked by :func:`check_split`)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    shown = {  # field: (cache's, recipe's), both printed
        "teacher.model": (manifest["teacher"]["model"], teacher_model),
        "data.max_length": (manifest["max_length"], max_length),
        "data.packing": (manifest["packing"], packing),
    }
    hashed = {  # field: (cache's, recipe's) fingerprints
        "tokenizer (token → id map)": (
            manifest["tokenizer_sha256"],
            fingerprint["tokenizer_sha256"],
        ),
        "chat template": (manifest["chat_template_sha256"], fingerprint["chat_template_sha256"]),
    }
    for field, (cached, now) in {**shown, **hashed}.items():
        if cached != now:
            detail = f" (cache: {cached!r}, recipe: {now!r})" if field in shown else ""
            raise CacheError(
                f"the teacher cache at {folder} was written for another {field}{detail}; write a "
                "cache for this recipe with `potstill cache`, or point teacher.cache elsewhere"
            )
    if manifest["temperature"] != temperature:
        raise CacheError(
            f"the teacher cache at {folder} holds log-probabilities at temperature "
            f"{manifest['temperature']}, but loss.kd_temperature is {temperature}: softening them "
            "needs the tail of the distribution, which a top-k cache does not keep; train at "
            f"loss.kd_temperature={manifest['temperature']} or write a cache at {temperature}"
        )


def check_split(manifest: dict[str, Any], folder: str | Path, split: str, examples) -> None:
    """Refuse a cache whose ``split`` was written for other tokenized examples."""
    entry = manifest["splits"].get(split)
    if entry is None:
        raise CacheError(f"the teacher cache at {folder} has no {split} split")
    if entry["examples"] != len(examples) or entry["data_sha256"] != examples_fingerprint(examples):
        raise CacheError(
            f"the teacher cache at {folder} was written for other {split} data "
            f"({entry['examples']:,} examples then, {len(examples):,} now, or other tokens): "
            "the data, its limits (data.max_train_records, data.max_eval_records) or the "
            "tokenization changed; write the cache again with `potstill cache`"
        )
