"""Training from a teacher cache against the live teacher, on the demo pair, in one process.

Writes one cache of the bundled SmolLM2-135M-Instruct teacher at the largest ``--k`` (or
``--coverage`` cap) over the recipe's data (timed: cache tokens/s), derives the smaller-k caches
from it (the top-k columns of a descending top-K are what a capture at k writes) and the
mass-coverage caches (each position's shortest prefix reaching the coverage, as ``potstill cache``
with ``cache.coverage`` writes it), then trains the 6-layer pruned student with
forward KL at equal steps and seed: once from the live teacher (dense, fused) and once from each
cache (sparse, no teacher in the step). Every student is then measured against the live teacher
on the held-out set (dense teacher KL, top-1 agreement). Fidelity is a cache student's held-out
teacher KL relative to the dense student's; speed is training tokens/s (non-padding input tokens
over the whole run, evaluation excluded).

    python benchmarks/teacher_cache.py                           # k = 4 8 16 32, 40,000 tokens
    python benchmarks/teacher_cache.py --k 16 --seeds 0 1 2      # the spread between seeds
    python benchmarks/teacher_cache.py --k 8 16 --tokens 80000 --dtype bfloat16
    python benchmarks/teacher_cache.py --k 16 --coverage 0.95:64 0.98:32   # coverage:cap
    python benchmarks/teacher_cache.py --k 16 --tail 8:14 4:7              # top-k + tail samples
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from _pair import cpu_name, held_out, train_one  # the demo pair's helpers (benchmarks/_pair.py)
from safetensors.torch import load_file, save_file

OUT = Path("runs/bench_teacher_cache")


def recipe(tokens: int, precision: str, *extra: str):
    from potstill.recipe import load_recipe

    return load_recipe(
        "recipes/token_level_forward_kl.yaml",
        [f"train.max_tokens={tokens}", f"train.precision={precision}", "data.max_eval_records=48",
         f"data.max_train_records={max(64, tokens // 100)}", "train.eval_every=0",
         "train.save_every=0", "train.save_model=false", "train.resume=false", "train.log_every=10",
         *extra],
    )  # fmt: skip


def derive(source: Path, k: int, out: Path, coverage: float | None = None) -> dict:
    """The cache ``source`` cut to its first ``k`` columns, or with ``coverage`` to each
    position's shortest prefix (of at most ``k``) reaching that mass, written to ``out``."""
    from potstill.teachers.cache import coverage_counts, sha256_file
    from potstill.teachers.writer import write_manifest

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    total_bytes = 0
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            tensors = load_file(str(source / shard["file"]))
            ids, lps = tensors["ids"][:, :k], tensors["logprobs"][:, :k]  # (P, k)
            if coverage is not None:  # as the writer does: from the stored values
                counts = coverage_counts(lps, coverage)  # (P,)
                keep = torch.arange(k) < counts[:, None]
                ids, lps = ids[keep], lps[keep]
                tensors["counts"] = counts.to(torch.uint8 if k < 256 else torch.int16)
                shard["entries"] = ids.numel()
            tensors["ids"], tensors["logprobs"] = ids.contiguous(), lps.contiguous()
            save_file(tensors, str(out / shard["file"]))
            shard["bytes"] = (out / shard["file"]).stat().st_size
            shard["sha256"] = sha256_file(out / shard["file"])
            total_bytes += shard["bytes"]
        entry["bytes"] = sum(s["bytes"] for s in entry["shards"])
    positions = sum(e["positions"] for e in manifest["splits"].values())
    manifest.update(top_k=k, coverage=coverage, bytes_per_position=total_bytes / positions)
    write_manifest(out, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=40_000, help="training budget per run")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each run")
    parser.add_argument(
        "--coverage",
        nargs="*",
        default=[],
        metavar="COVERAGE[:CAP]",
        help="also train from mass-coverage caches, e.g. 0.95:64 (at most CAP entries a "
        "position, 64 if not given)",
    )
    parser.add_argument(
        "--tail",
        nargs="*",
        default=[],
        metavar="K:M",
        help="also train from caches of the top K plus M tokens sampled from the rest "
        "(cache.tail_samples; each written by its own teacher pass)",
    )
    args = parser.parse_args()
    tails = [tuple(int(x) for x in spec.split(":")) for spec in args.tail]
    coverages = [(float(c.split(":")[0]), int(c.split(":")[1]) if ":" in c else 64)
                 for c in args.coverage]  # fmt: skip
    largest = max(args.k + [cap for _, cap in coverages])
    from potstill.cache import run_cache
    from potstill.models import load_model

    torch.manual_seed(0)
    teacher = load_model("bundled:smollm2-135m-instruct").eval().requires_grad_(False)
    biggest = OUT / f"cache_k{largest}"
    shutil.rmtree(OUT, ignore_errors=True)
    cache_recipe = recipe(args.tokens, args.precision, f"teacher.cache={biggest}",
                          f"cache.top_k={largest}", f"cache.dtype={args.dtype}")  # fmt: skip
    t0 = time.perf_counter()
    manifest = run_cache(cache_recipe)
    cache_seconds = time.perf_counter() - t0
    positions = sum(e["positions"] for e in manifest["splits"].values())
    for k, m in tails:  # tail draws need the whole distribution: a teacher pass each
        run_cache(recipe(args.tokens, args.precision, f"teacher.cache={OUT / f'cache_k{k}_t{m}'}",
                         f"cache.top_k={k}", f"cache.tail_samples={m}",
                         f"cache.dtype={args.dtype}"))  # fmt: skip
    for k, m in tails:  # tail draws need the whole distribution: a teacher pass each
        run_cache(recipe(args.tokens, args.precision, f"teacher.cache={OUT / f'cache_k{k}_t{m}'}",
                         f"cache.top_k={k}", f"cache.tail_samples={m}",
                         f"cache.dtype={args.dtype}"))  # fmt: skip

    runs: dict[str, list] = {}  # signal -> [(bytes/position, result, metrics) per seed]
    for seed in args.seeds:
        live = recipe(args.tokens, args.precision, f"train.output_dir={OUT / 'live'}",
                      f"train.seed={seed}")  # fmt: skip
        models, data, result = train_one(live, teacher)
        runs.setdefault("live teacher (dense)", []).append(
            (None, result, held_out(models, data, live, teacher))
        )
        variants = [(k, None) for k in sorted(args.k)]
        variants += [(cap, c) for c, cap in coverages]
        variants += [(k, f"t{m}") for k, m in tails]
        for k, coverage in variants:
            if isinstance(coverage, str):  # top-k + tail samples
                tag, name = f"k{k}_{coverage}", f"cache k={k} + {coverage[1:]} tail samples"
            elif coverage is None:
                tag, name = f"k{k}", f"cache k={k}"
            else:
                tag, name = f"cov{coverage}_k{k}", f"cache coverage {coverage}, k≤{k}"
            folder = biggest if tag == f"k{largest}" else OUT / f"cache_{tag}"
            if not (folder / "manifest.json").is_file():
                derive(biggest, k, folder, coverage)
            m = json.loads((folder / "manifest.json").read_text())
            r = recipe(args.tokens, args.precision, "teacher.source=cache",
                       f"teacher.cache={folder}", f"train.output_dir={OUT / tag}",
                       f"train.seed={seed}")  # fmt: skip
            models, data, result = train_one(r, None)
            runs.setdefault(f"{name} {args.dtype}", []).append(
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
