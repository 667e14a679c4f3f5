"""Training from a teacher cache against the live teacher, on the demo pair, in one process.

Writes one cache of the bundled SmolLM2-135M-Instruct teacher at the largest ``--k`` over the
recipe's data (timed: cache tokens/s), derives the smaller-k caches from it (the top-k columns of a
descending top-K are what a capture at k writes), then trains the 6-layer pruned student with
forward KL at equal steps and seed: once from the live teacher (dense, fused) and once from each
cache (sparse, no teacher in the step). Every student is then measured against the live teacher
on the held-out set (dense teacher KL, top-1 agreement). Fidelity is a cache student's held-out
teacher KL relative to the dense student's; speed is training tokens/s (non-padding input tokens
over the whole run, evaluation excluded).

    python benchmarks/teacher_cache.py                           # k = 4 8 16 32, 40,000 tokens
    python benchmarks/teacher_cache.py --k 16 --seeds 0 1 2      # the spread between seeds
    python benchmarks/teacher_cache.py --k 8 16 --tokens 80000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OUT = Path("runs/bench_teacher_cache")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
        flags = next(line for line in out.splitlines() if line.startswith("Flags"))
        extras = [f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in flags.split()]
        return f"{name} ({', '.join(extras)})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def recipe(tokens: int, precision: str, *extra: str):
    from potstill.recipe import load_recipe

    return load_recipe(
        "recipes/token_level_forward_kl.yaml",
        [f"train.max_tokens={tokens}", f"train.precision={precision}", "data.max_eval_records=48",
         f"data.max_train_records={max(64, tokens // 100)}", "train.eval_every=0",
         "train.save_every=0", "train.save_model=false", "train.resume=false", "train.log_every=10",
         *extra],
    )  # fmt: skip


def derive(source: Path, k: int, out: Path) -> dict:
    """The cache ``source`` cut to its first ``k`` columns, written to ``out``."""
    from potstill.teachers.cache import sha256_file
    from potstill.teachers.writer import write_manifest

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    total_bytes = 0
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            tensors = load_file(str(source / shard["file"]))
            tensors["ids"] = tensors["ids"][:, :k].contiguous()
            tensors["logprobs"] = tensors["logprobs"][:, :k].contiguous()
            save_file(tensors, str(out / shard["file"]))
            shard["bytes"] = (out / shard["file"]).stat().st_size
            shard["sha256"] = sha256_file(out / shard["file"])
            total_bytes += shard["bytes"]
        entry["bytes"] = sum(s["bytes"] for s in entry["shards"])
    positions = sum(e["positions"] for e in manifest["splits"].values())
    manifest.update(top_k=k, bytes_per_position=total_bytes / positions)
    write_manifest(out, manifest)
    return manifest


def train_one(r, teacher):
    from potstill.methods import build_method
    from potstill.prepare import load_data, load_models
    from potstill.train import train

    models = load_models(r, teacher=teacher if r.teacher.source == "live" else None)
    method = build_method(r, vocab_size=models.vocab_size)
    data = load_data(r, models.tokenizer, method)
    result = train(
        r, method, student=models.student, tokenizer=models.tokenizer, train_examples=data.train,
        teacher=models.teacher, vocab_size=models.vocab_size,
    )  # fmt: skip
    return models, data, result


def held_out(models, data, r, teacher) -> dict[str, float]:
    """The student against the live (dense) teacher on the held-out set."""
    from potstill.evaluate import evaluate
    from potstill.train import fixed_batches
    from potstill.utils import autocast_dtype, pad_token_id

    batches = fixed_batches(data.eval, batch_size=4, pad_id=pad_token_id(models.tokenizer))
    return evaluate(models.student, batches, teacher=teacher, vocab_size=models.vocab_size,
                    autocast_dtype=autocast_dtype(r.train.precision))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=40_000, help="training budget per run")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each run")
    args = parser.parse_args()
    from potstill.cache import run_cache
    from potstill.models import load_model

    torch.manual_seed(0)
    teacher = load_model("bundled:smollm2-135m-instruct").eval().requires_grad_(False)
    biggest = OUT / f"cache_k{max(args.k)}"
    shutil.rmtree(OUT, ignore_errors=True)
    cache_recipe = recipe(args.tokens, args.precision, f"teacher.cache={biggest}",
                          f"cache.top_k={max(args.k)}", f"cache.dtype={args.dtype}")  # fmt: skip
    t0 = time.perf_counter()
    manifest = run_cache(cache_recipe)
    cache_seconds = time.perf_counter() - t0
    positions = sum(e["positions"] for e in manifest["splits"].values())

    runs: dict[str, list] = {}  # signal -> [(bytes/position, result, metrics) per seed]
    for seed in args.seeds:
        live = recipe(args.tokens, args.precision, f"train.output_dir={OUT / 'live'}",
                      f"train.seed={seed}")  # fmt: skip
        models, data, result = train_one(live, teacher)
        runs.setdefault("live teacher (dense)", []).append(
            (None, result, held_out(models, data, live, teacher))
        )
        for k in sorted(args.k):
            folder = biggest if k == max(args.k) else OUT / f"cache_k{k}"
            if not (folder / "manifest.json").is_file():
                derive(biggest, k, folder)
            m = json.loads((folder / "manifest.json").read_text())
            r = recipe(args.tokens, args.precision, "teacher.source=cache",
                       f"teacher.cache={folder}", f"train.output_dir={OUT / f'k{k}'}",
                       f"train.seed={seed}")  # fmt: skip
            models, data, result = train_one(r, None)
            runs.setdefault(f"cache k={k} {args.dtype}", []).append(
                (m["bytes_per_position"], result, held_out(models, data, r, teacher))
            )

    dense = runs["live teacher (dense)"]
    print(f"\nCPU: {cpu_name()}; torch {torch.__version__}; precision {args.precision}")
    print(f"cache written: {positions:,} positions in {cache_seconds:.1f} s "
          f"({positions / cache_seconds:,.0f} positions/s, teacher forward included)")  # fmt: skip
    print(f"training: {dense[0][1].steps} steps of a {args.tokens:,}-token budget, forward KL, "
          f"seeds {args.seeds} (data order); held-out: 48 problems, dense teacher\n")  # fmt: skip
    print("| teacher signal | bytes/position | teacher KL (mean) | vs dense, per seed | mean "
          "| top-1 | tokens/s | speed |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name, seeds in runs.items():
        rel = [
            100 * (m["teacher_kl"] / d[2]["teacher_kl"] - 1)
            for (_, _, m), d in zip(seeds, dense, strict=True)
        ]
        speed = [
            r.tokens / r.seconds / (d[1].tokens / d[1].seconds)
            for (_, r, _), d in zip(seeds, dense, strict=True)
        ]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        bpp = seeds[0][0]
        print(
            f"| {name} | {'' if bpp is None else f'{bpp:.1f}'} | "
            f"{mean([m['teacher_kl'] for _, _, m in seeds]):.4f} | "
            f"{', '.join(f'{x:+.2f}%' for x in rel)} | {mean(rel):+.2f}% | "
            f"{100 * mean([m['top1_agreement'] for _, _, m in seeds]):.1f}% | "
            f"{mean([r.tokens / r.seconds for _, r, _ in seeds]):.0f} | {mean(speed):.2f}x |"
        )


if __name__ == "__main__":
    main()
