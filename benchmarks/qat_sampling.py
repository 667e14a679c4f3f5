"""Tokens/s of on-policy sampling from a QAT student: weights rounded once per sampling call
(``parametrize.cached``, what ``on_policy``'s sampler does) against rounded at every decoded
token (the parametrization as training reads it).

Student: SmolLM2-135M-Instruct (fp32) on GGUF's Q4_0 grid (``student.qat.format: q4_0``); chat
prompts = the user turns of the first ``--prompts`` bundled basic_arithmetic records, sampled at
T = 1 with ``--new-tokens`` new tokens, one batch. Both ways must draw the same samples.

    python benchmarks/qat_sampling.py                     # 8 prompts × 32 tokens (~2 min on 2 cores)

CPU timings swing with other load on the machine: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import time

from _pair import cpu_name  # the CPU beside every figure (benchmarks/_pair.py)

from potstill import students
from potstill.data import load_records
from potstill.generation.base import SamplingParams
from potstill.methods.on_policy import Sampler
from potstill.models import load_model, load_tokenizer

MODEL = "bundled:smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--format", default="q4_0", choices=["q4_0", "q8_0"])
    args = ap.parse_args()

    tok = load_tokenizer(MODEL)
    student = load_model(MODEL, dtype="float32")
    students.add_qat(student, args.format)
    sampler = Sampler(student, tok, dtype=None, batch_size=args.prompts)
    records = load_records("bundled:rg/basic_arithmetic", limit=args.prompts)
    prompts = [
        sampler.backend.prompt_token_ids([next(m for m in r["messages"] if m["role"] == "user")])
        for r in records
    ]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    cached, t_cached = timed(lambda: sampler.sample(prompts, params))
    every, t_every = timed(lambda: sampler.backend.generate_ids(prompts, params))
    every = [s[0][: len(c)] for s, c in zip(every, cached, strict=True)]
    tokens = sum(len(s) for s in cached)
    print(f"{cpu_name()}, load average {os.getloadavg()[0]:.2f}")
    print(
        f"QAT {args.format} student, {args.prompts} prompts × {args.new_tokens} new tokens, T = 1"
    )
    print(f"  rounded at every decoded token: {tokens / t_every:6.1f} tokens/s ({t_every:.1f} s)")
    print(f"  rounded once per call (cached): {tokens / t_cached:6.1f} tokens/s ({t_cached:.1f} s)")
    print(f"  speed-up {t_every / t_cached:.2f}×; same samples: {every == cached}")


if __name__ == "__main__":
    main()
