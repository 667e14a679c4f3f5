"""Tokens/s of HFBackend's batched generation against one prompt at a time.

Teacher SmolLM2-135M-Instruct (fp32), chat prompts = the user turns of the first 32 bundled
basic_arithmetic records, greedy, max_new_tokens 64. Every batch size generates all the prompts;
tokens/s counts generated tokens (EOS included, as ``Completion.num_tokens`` does) over the wall
time of the whole call, prefill included. Batch size 1 is the one-at-a-time baseline; it runs
only the first ``--baseline-prompts`` prompts (8 by default: one at a time is slow, and a rate is
a rate). The last column checks that batching leaves greedy outputs unchanged (compared on the
prompts both runs share). ``--anchor`` adds a row for
transformers' own ``model.generate`` (left-padded, greedy) at the largest batch size.

    python benchmarks/generate_throughput.py                  # batch 1, 8, 16 (~3 min on 2 cores)
    python benchmarks/generate_throughput.py --anchor --batch-sizes 1 4 16 32 --prompts 64

CPU timings swing with other load on the machine: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from potstill.data import load_records
from potstill.generation.base import SamplingParams
from potstill.generation.hf import HFBackend

MODEL = "bundled:smollm2-135m-instruct"


def chat_prompts(n: int) -> list[list[dict]]:
    records = load_records("bundled:rg/basic_arithmetic", limit=n)
    return [[next(m for m in r["messages"] if m["role"] == "user")] for r in records]


def run_backend(backend: HFBackend, prompts, params: SamplingParams, batch_size: int):
    backend.batch_size = batch_size
    start = time.perf_counter()
    results = backend.generate(prompts, params)
    seconds = time.perf_counter() - start
    texts = [c.text for per_prompt in results for c in per_prompt]
    return sum(c.num_tokens for per_prompt in results for c in per_prompt), seconds, texts


@torch.inference_mode()
def run_hf_generate(backend: HFBackend, prompts, max_new_tokens: int, batch_size: int):
    """transformers' generate, left-padded, greedy; tokens counted up to and with the EOS."""
    tok, model = backend.tokenizer, backend.model
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts
    ]
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), batch_size):
        batch = tok(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=backend.pad_id
        )
        new = out[:, batch["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
        for row in new.tolist():
            ends = [j for j, t in enumerate(row) if t in backend.eos_ids]
            tokens += ends[0] + 1 if ends else len(row)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--baseline-prompts", type=int, default=8, help="prompts at batch 1")
    parser.add_argument("--anchor", action="store_true", help="also time model.generate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = HFBackend(MODEL, dtype="float32")
    prompts = chat_prompts(args.prompts)
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    backend.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up

    rows, baseline, reference = [], None, None
    for batch_size in args.batch_sizes:
        subset = prompts[: args.baseline_prompts] if batch_size == 1 else prompts
        tokens, seconds, texts = run_backend(backend, subset, params, batch_size)
        reference = reference or texts
        rate = tokens / seconds
        baseline = baseline or rate
        same = sum(a == b for a, b in zip(texts, reference, strict=False))  # shared prompts
        shared = min(len(texts), len(reference))
        name = f"HFBackend, batch {batch_size}"
        rows.append((name, len(subset), tokens, seconds, rate, rate / baseline, f"{same}/{shared}"))
        print(f"batch {batch_size}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr)
    if args.anchor:
        batch_size = max(args.batch_sizes)
        tokens, seconds = run_hf_generate(backend, prompts, args.max_new_tokens, batch_size)
        rate = tokens / seconds
        name = f"model.generate, batch {batch_size}"
        rows.append((name, len(prompts), tokens, seconds, rate, rate / baseline, "-"))

    print(
        f"\n{MODEL} fp32, chat prompts from bundled:rg/basic_arithmetic, greedy, "
        f"max_new_tokens {args.max_new_tokens}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| run | prompts | tokens | seconds | tokens/s | vs batch 1 | same text as batch 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, tokens, seconds, rate, speedup, same in rows:
        print(f"| {name} | {n} | {tokens} | {seconds:.1f} | {rate:.1f} | {speedup:.2f}x | {same} |")


if __name__ == "__main__":
    main()
