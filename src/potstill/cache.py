"""``potstill cache RECIPE``: run the teacher once over the recipe's training and held-out data
and write its top-k log-probabilities to ``teacher.cache`` (format:
:mod:`potstill.teachers.cache`). Training with ``teacher.source=cache`` then loads no teacher.
The teacher runs in this process, or, with ``teacher.source=server``, a server scores the data.

Resumable: re-running the same command after a kill keeps the shards the ledger vouches for and
writes the rest; the finished cache equals an uninterrupted run's byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from potstill.errors import RecipeError
from potstill.models import check_vocab_compatible, load_config, load_model, load_tokenizer
from potstill.prepare import load_data
from potstill.recipe import Recipe
from potstill.teachers.cache import (
    DTYPES,
    FORMAT,
    MANIFEST,
    VERSION,
    examples_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from potstill.teachers.server import served_teacher
from potstill.teachers.writer import (
    CaptureSettings,
    finished_shards,
    max_bytes_per_position,
    token_id_dtype,
    top_k_rows,
    write_manifest,
    write_split,
)
from potstill.utils import (
    autocast_dtype,
    default_device_type,
    folder_bytes,
    free_bytes,
    human_bytes,
    pad_token_id,
    require_free,
    when_disk_fills,
)

SETTINGS = "settings.json"  # what a partial cache was started with


def run_cache(r: Recipe) -> dict[str, Any]:
    """Write (or finish) the cache; returns its manifest."""
    if not r.teacher.model:
        raise RecipeError("`potstill cache` runs the teacher: set teacher.model")
    if not r.teacher.cache:
        raise RecipeError("`potstill cache` writes to teacher.cache: set it to a folder")
    out = Path(r.teacher.cache)
    served = r.teacher.source == "server"  # else the teacher model runs here
    if served and r.cache.tail_samples:
        raise RecipeError(
            "cache.tail_samples draws from the teacher's whole distribution, which a server "
            "does not return (only its top-k); set cache.tail_samples=0, or write the cache "
            "with the teacher in-process (teacher.source=live)"
        )
    live = dataclasses.replace(r, teacher=dataclasses.replace(r.teacher, source="live"))
    settings = CaptureSettings(
        top_k=r.cache.top_k,
        dtype=r.cache.dtype,
        coverage=r.cache.coverage,
        tail_samples=r.cache.tail_samples,
        temperature=r.loss.kd_temperature,
        shard_positions=r.cache.shard_positions,
        batch_size=r.cache.batch_size,
        chunk_size=r.loss.chunk_size,
        # the teacher computes as it would in this recipe's training (train.precision)
        autocast=None if served else _autocast_name(r.train.precision),
    )
    source = r.student.model or r.teacher.model  # the tokenizer training reads the data with
    tokenizer = load_tokenizer(source, trust_remote_code=r.student.trust_remote_code)
    data = load_data(live, tokenizer)
    started = {
        "teacher": r.teacher.model,
        "server": r.teacher.server_url if served else None,
        "settings": dataclasses.asdict(settings),
        "train": examples_fingerprint(data.train),
        "eval": examples_fingerprint(data.eval),
    }
    _claim(out, started)
    if (out / MANIFEST).is_file():
        print(f"teacher cache at {out} is complete")
        return json.loads((out / MANIFEST).read_text())

    device = torch.device(default_device_type())
    teacher_tokenizer = load_tokenizer(
        r.teacher.model, trust_remote_code=r.teacher.trust_remote_code
    )
    if served:  # the server scores; its model's config says how many rows its head has
        teacher = None
        rows = load_config(r.teacher.model, trust_remote_code=r.teacher.trust_remote_code)
        rows = rows.vocab_size
        server = served_teacher(r.teacher, settings.top_k, settings.temperature)

        def score(batch: dict) -> tuple:
            return server.rows(batch, batch["labels"] != -100)

    else:
        teacher = load_model(
            r.teacher.model, dtype=r.teacher.dtype, trust_remote_code=r.teacher.trust_remote_code,
            allow_pickle=r.teacher.allow_pickle,
        )  # fmt: skip
        teacher.requires_grad_(False).eval().to(device)
        rows = teacher.get_output_embeddings().weight.shape[0]
    vocab_size = check_vocab_compatible(
        teacher_tokenizer, tokenizer, teacher_vocab_rows=rows, student_vocab_rows=rows
    )
    if not served:
        score = functools.partial(top_k_rows, teacher, vocab_size=vocab_size, settings=settings)
    splits: dict[str, Any] = {}
    # bytes per (id, log-probability) pair, and per position for its entry count (coverage rule)
    # and its tail draws and entropy; the shards' small headers and offsets come on top
    most = max_bytes_per_position(settings, vocab_size)
    entry_bytes = token_id_dtype(vocab_size).itemsize + DTYPES[settings.dtype].itemsize
    position_bytes = most - settings.top_k * entry_bytes
    seen = {"positions": 0, "entries": 0}
    total = sum(sum(e.target_mask[1:]) for e in (*data.train, *data.eval))
    _check_disk(out, total * most + 8 * (len(data.train) + len(data.eval)), most)
    with (
        _said_when_out_of_disk(out),
        tqdm(total=total, unit="tok", desc=f"cache {out.name}", smoothing=0.1) as bar,
    ):
        for split, examples in (("train", data.train), ("eval", data.eval)):

            def on_batch(_examples: int, positions: int, entries: int, split: str = split):
                bar.update(positions)
                seen["positions"] += positions
                seen["entries"] += entries
                per = entry_bytes * seen["entries"] / max(seen["positions"], 1) + position_bytes
                bar.set_postfix(split=split, bytes_per_token=f"{per:.1f}")

            shards = write_split(
                score,
                examples,
                out,
                split,
                pad_token_id=pad_token_id(tokenizer),
                vocab_size=vocab_size,
                settings=settings,
                device=device,
                on_batch=on_batch,
            )
            splits[split] = {
                "examples": len(examples),
                "positions": sum(s["positions"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "data_sha256": started[split],  # hashed once, when the folder was claimed
                "shards": shards,
            }
    positions = sum(s["positions"] for s in splits.values())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {
            "model": r.teacher.model,
            "dtype": None if served else r.teacher.dtype,
            "autocast": settings.autocast,  # the compute dtype of its forward passes, if not fp32
            "server_url": r.teacher.server_url if served else None,
            "weights_sha256": None if served else weights_fingerprint(teacher),
        },
        **tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "max_length": r.data.max_length,
        "packing": r.data.packing,
        "data": {
            "train": r.data.train,
            "eval": r.data.eval,
            "max_train_records": r.data.max_train_records,
            "max_eval_records": r.data.max_eval_records,
        },
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "coverage": settings.coverage,  # set: ragged shards, k_i ≤ top_k entries per position
        "tail_samples": settings.tail_samples,  # draws per position from the rest (forward KL)
        "dtype": settings.dtype,
        "bytes_per_position": sum(s["bytes"] for s in splits.values()) / max(positions, 1),
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest


def _autocast_name(precision: str) -> str | None:
    dtype = autocast_dtype(precision, default_device_type())
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _check_disk(out: Path, need: float, per_position: int) -> None:
    """Refuse a cache whose disk cannot take what is left to write (``need`` at most, less what
    a resumed cache already holds)."""
    left = need - folder_bytes(out)
    require_free(
        out,
        left,
        lambda free: (
            f"teacher.cache {out}: its disk has {human_bytes(free)} free, and the cache needs up "
            f"to {human_bytes(left)} more ({per_position} bytes per supervised position at most: "
            "top-k ids and log-probabilities). Free space there, point teacher.cache at another "
            "disk, or store less: a lower cache.top_k, or cache.coverage (fewer entries where the "
            "teacher is sure)"
        ),
    )


def _said_when_out_of_disk(out: Path) -> contextlib.AbstractContextManager:
    """A full disk while writing: the partial shard removed, one line saying what is kept."""

    def cleanup() -> None:
        for partial in out.glob("*.tmp"):
            partial.unlink(missing_ok=True)

    def says() -> str:
        kept = sum(len(finished_shards(out, split)) for split in ("train", "eval"))
        return (
            f"the disk of {out} ran out while writing the teacher cache "
            f"({human_bytes(free_bytes(out))} free now); its {kept} finished shards are kept: "
            "free space and run the same command again to finish it"
        )

    return when_disk_fills(out, cleanup, says)


def _claim(out: Path, started: dict[str, Any]) -> None:
    """Mark ``out`` as this recipe's cache, or refuse a folder that holds another's."""
    path = out / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        if before != started:
            changed = sorted(k for k in started if before.get(k) != started[k])
            raise RecipeError(
                f"{out} holds a teacher cache of another recipe ({', '.join(changed)} differ); "
                "choose another teacher.cache folder, or delete that one to write it again"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise RecipeError(
            f"{out} is not empty and holds no teacher cache; choose an empty or new folder "
            "for teacher.cache"
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(started, indent=2, sort_keys=True))
