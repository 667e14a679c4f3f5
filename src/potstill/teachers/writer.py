"""Writing a teacher cache (format: :mod:`potstill.teachers.cache`): the live teacher's top-k
log-probabilities at every supervised position, shard by shard, resumable after a kill."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from potstill.data import Example, collate
from potstill.lm import final_hidden, lm_head
from potstill.losses.rows import chunked_rows, head_logits_fp32
from potstill.teachers.cache import DTYPES, MANIFEST, coverage_counts, sha256_file


@dataclass(frozen=True)
class CaptureSettings:
    top_k: int = 16
    dtype: str = "float16"  # of the stored log-probabilities
    coverage: float | None = None  # keep per position the fewest entries reaching this mass
    tail_samples: int = 0  # tokens drawn per position from the teacher's rest (forward KL's tail)
    temperature: float = 1.0  # the teacher's softmax temperature at capture
    shard_positions: int = 262_144  # a shard closes at the first batch boundary past this
    batch_size: int = 8
    chunk_size: int | None = None  # rows per head chunk (None: from a memory budget)
    autocast: str | None = None  # "bfloat16": the teacher runs as it would in training (autocast)


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _ledger(out: Path, split: str) -> Path:
    return out / f"{split}.ledger.jsonl"


def finished_shards(out: Path, split: str) -> list[dict[str, Any]]:
    """The ledger's shards that are still on disk and intact, in order; stops at the first one
    that is not (a resumed writer rewrites from there)."""
    path = _ledger(out, split)
    shards: list[dict[str, Any]] = []
    if not path.is_file():
        return shards
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            break
        file = out / entry["file"]
        if entry["start"] != (shards[-1]["end"] if shards else 0) or not file.is_file():
            break
        if sha256_file(file) != entry["sha256"]:
            break
        shards.append(entry)
    return shards


@torch.no_grad()
def top_k_rows(
    teacher: nn.Module,
    batch: dict[str, Tensor],
    *,
    vocab_size: int | None,
    settings: CaptureSettings,
) -> tuple[Tensor, Tensor]:
    """The teacher's top-k ``(ids, log-probs)`` at the batch's supervised positions, in the order
    of ``labels != -100``: (P, k) long, (P, k) fp32. With ``settings.tail_samples`` = m, also
    ``(tail (P, m) long, tail entropy (P,) fp32)``: m tokens drawn from the teacher's distribution
    outside the entries the cache keeps (all k, or the coverage rule's first k_i), renormalised,
    and that distribution's entropy; the draws are seeded by the batch's tokens, so a resumed
    writer draws the same."""
    mask = batch["labels"] != -100  # (B, T)
    dtype = getattr(torch, settings.autocast) if settings.autocast else None
    device = batch["input_ids"].device.type
    temperature, k, m = settings.temperature, settings.top_k, settings.tail_samples
    generator = torch.Generator(device=batch["input_ids"].device)
    generator.manual_seed(int(batch["input_ids"].sum()) * 1_000_003 + batch["input_ids"].numel())

    def rows(h: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, ...]:
        logp = torch.log_softmax(head_logits_fp32(h, w, b) / temperature, dim=-1)  # (c, V)
        top, ids = logp.topk(k, dim=-1)  # (c, k)
        if not m:
            return ids, top
        kept = torch.full((h.shape[0],), k, device=h.device)  # (c,) entries the cache keeps
        if settings.coverage is not None:  # as the writer will count them: stored values
            kept = coverage_counts(top.to(DTYPES[settings.dtype]), settings.coverage)
        keep = torch.arange(k, device=h.device) < kept[:, None]  # (c, k)
        rest = torch.ones_like(logp).scatter(1, ids, (~keep).float())  # (c, V) 1 off the kept
        p = logp.exp() * rest  # (c, V)
        mass = p.sum(-1, keepdim=True)
        tail = torch.where(mass > 0, p / mass.clamp_min(1e-38), rest / rest.sum(-1, keepdim=True))
        draws = torch.multinomial(tail, m, replacement=True, generator=generator)  # (c, m)
        return ids, top, draws, -torch.special.xlogy(tail, tail).sum(-1)

    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        hidden = final_hidden(teacher, batch)[mask]  # (P, H)
        weight, bias = lm_head(teacher, vocab_size)
        return chunked_rows(rows, hidden, weight, bias, (), chunk_size=settings.chunk_size)


def token_id_dtype(vocab_size: int | None) -> torch.dtype:
    """How a cache stores token ids: two bytes each where the vocabulary has at most 65,536
    entries, else four."""
    return torch.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else torch.int32


def max_bytes_per_position(settings: CaptureSettings, vocab_size: int | None) -> int:
    """At most what a shard stores per supervised position: ``top_k`` ids and log-probabilities
    (fewer under a coverage rule, which adds each position's entry count), and the tail's draws
    and entropy. A shard adds its header and 8 bytes per example on top."""
    ids, value = token_id_dtype(vocab_size).itemsize, DTYPES[settings.dtype].itemsize
    count = 0 if settings.coverage is None else 1 if settings.top_k < 1 << 8 else 2
    tail = settings.tail_samples * ids + value if settings.tail_samples else 0
    return settings.top_k * (ids + value) + count + tail


def write_split(
    score: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
    examples: Sequence[Example],
    out: Path,
    split: str,
    *,
    pad_token_id: int,
    vocab_size: int | None,
    settings: CaptureSettings,
    device: torch.device | str = "cpu",
    on_batch: Any = None,
) -> list[dict[str, Any]]:
    """Write (or finish writing) one split's shards; returns their ledger entries. ``score``
    gives the teacher's top-k ``(ids, log-probs)`` at a collated batch's supervised positions
    (:func:`top_k_rows` of a model here, or a served teacher's ``rows``).

    Batches are consecutive examples and shards whole batches, so a resumed writer, which starts
    at the first shard the ledger does not vouch for, forms the same batches an uninterrupted one
    did and writes the same bytes. ``on_batch(examples, positions, entries)`` reports progress
    (entries: the (id, log-prob) pairs kept, fewer than positions × k under a coverage rule)."""
    out.mkdir(parents=True, exist_ok=True)
    shards = finished_shards(out, split)
    ledger = _ledger(out, split)
    ledger.write_text("".join(json.dumps(s) + "\n" for s in shards))  # drop what is not vouched
    start = shards[-1]["end"] if shards else 0
    if on_batch is not None and start:
        on_batch(start, sum(s["positions"] for s in shards), sum(s["entries"] for s in shards))
    id_dtype = token_id_dtype(vocab_size)
    k_dtype = torch.uint8 if settings.top_k < 1 << 8 else torch.int16  # entries per position
    ids_parts: list[Tensor] = []
    lp_parts: list[Tensor] = []
    k_parts: list[Tensor] = []  # coverage rule: entries kept per position
    tail_parts: list[Tensor] = []  # tail samples: draws (P, m) and entropy (P,)
    entropy_parts: list[Tensor] = []
    counts: list[int] = []
    shard_start = start
    for first in range(start, len(examples), settings.batch_size):
        chunk = list(examples[first : first + settings.batch_size])
        batch = {
            key: value.to(device)
            for key, value in collate(chunk, pad_token_id=pad_token_id).items()
        }
        # (P, k), (P, k) at the batch's supervised positions [, (P, m) tail draws, (P,) entropy]
        ids, top, *tail = score(batch)
        ids, top = ids.cpu().to(id_dtype), top.cpu().to(DTYPES[settings.dtype])
        if settings.tail_samples:
            tail_parts.append(tail[0].cpu().to(id_dtype))
            entropy_parts.append(tail[1].cpu().to(DTYPES[settings.dtype]))
        if settings.coverage is not None:  # ragged: k_i entries at position i, flat (E,)
            k = coverage_counts(top, settings.coverage)  # (P,) from the stored values
            keep = torch.arange(top.shape[1]) < k[:, None]  # (P, k)
            ids, top = ids[keep], top[keep]
            k_parts.append(k.to(k_dtype))
        ids_parts.append(ids)
        lp_parts.append(top)
        counts += (batch["labels"] != -100).sum(1).tolist()
        end = first + len(chunk)
        if on_batch is not None:
            on_batch(len(chunk), sum(counts[-len(chunk) :]), top.numel())
        if sum(counts) >= settings.shard_positions or end == len(examples):
            cat = torch.cat
            tensors = {"ids": cat(ids_parts), "logprobs": cat(lp_parts)}
            if k_parts:
                tensors["counts"] = torch.cat(k_parts)
            if tail_parts:
                tensors["tail"], tensors["tail_entropy"] = cat(tail_parts), cat(entropy_parts)
            shards.append(_close_shard(out, split, len(shards), shard_start, end, tensors, counts))
            with ledger.open("a") as f:
                f.write(json.dumps(shards[-1]) + "\n")
            ids_parts, lp_parts, k_parts, counts, shard_start = [], [], [], [], end
            tail_parts, entropy_parts = [], []
    return shards


def _close_shard(out, split, index, start, end, tensors, counts) -> dict[str, Any]:
    name = f"{split}-{index:05d}.safetensors"
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    _atomic_save({**tensors, "offsets": offsets}, out / name)
    return {
        "file": name,
        "start": start,
        "end": end,
        "positions": int(offsets[-1]),
        "entries": tensors["ids"].numel(),
        "bytes": (out / name).stat().st_size,
        "sha256": sha256_file(out / name),
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
