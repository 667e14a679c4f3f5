"""Step time of on-policy distillation (GKD) on the demo pair, against an off-policy step over the
same tokens and against TRL's GKDTrainer with lmbda=1; and sampling tokens/s with and without
the KV cache.

Teacher SmolLM2-135M-Instruct, student pruned to 6 layers, bundled gsm_symbolic prompts, batch 4,
128 new tokens sampled at T=1 (top-p off), reverse KL at T=1, at ``--precision`` (default auto: bf16
autocast where bf16 matmuls beat fp32 on this CPU, else fp32). Each run is its own process:
  * potstill_on:  method on_policy, lmbda=1 — the student samples every batch; its sequences are
                  saved;
  * potstill_off: the same method at lmbda=0 (token-level KD) on exactly those sequences, so the
                  step covers the same tokens; the ratio on/off compares seconds per step scaled
                  to equal tokens;
  * trl:          TRL's GKDTrainer, lmbda=1, beta=1 (its reverse KL), temperature=1,
                  max_new_tokens=128, on the same models and prompts;
  * sampling:     the student's sampler alone (a bf16 twin under bf16) on 4 prompts × 128 tokens,
                  KV-cached (potstill's HFBackend, eager and compiled) and recomputing the whole
                  prefix at every token.
The training runs decode with ``on_policy.compile`` as ``--compile`` says (default on, as in
recipes/on_policy_gkd.yaml). The first steps (warm-up, compilation included) are excluded from the
timings.

    python benchmarks/on_policy_step.py
    python benchmarks/on_policy_step.py --only potstill_on potstill_off --steps 6 --precision bf16
    python benchmarks/on_policy_step.py --only potstill_on --compile off
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _pair import models, records  # the demo pair (benchmarks/_pair.py)

from potstill.utils import autocast_dtype, precision_note

WARMUP = 2
NAMES = ["potstill_on", "potstill_off", "trl", "sampling"]
SEQUENCES = os.path.join(tempfile.gettempdir(), "potstill-on-policy-sequences.json")


def run_potstill(steps: int, lmbda: float, precision: str, compile: bool) -> dict:
    from potstill.data import Example, tokenize_records
    from potstill.methods import build_method
    from potstill.recipe import load_recipe
    from potstill.train import train

    teacher, student, tok = models()
    if lmbda > 0:
        examples, _ = tokenize_records(records(4 * steps), tok, max_length=256)
    else:  # the on-policy run's own sequences: the same tokens, completions supervised
        with open(SEQUENCES) as f:
            rows = json.load(f)
        examples = [Example(input_ids=r["ids"], target_mask=r["mask"]) for r in rows]
    recipe = load_recipe(
        None,
        ["method=on_policy", f"on_policy.lmbda={lmbda}", "on_policy.max_new_tokens=128",
         f"on_policy.compile={str(compile).lower()}",
         "on_policy.eval_samples=false", "teacher.model=unused", "student.init=prune",
         "student.keep_layers=[0]", f"train.max_steps={steps}", "train.batch_size=4",
         f"train.precision={precision}", "train.log_every=1", "train.save_every=0", "train.save_model=false",
         "train.output_dir=/tmp/potstill-on-policy-bench", "train.resume=false"],
    )  # fmt: skip
    method = build_method(recipe, vocab_size=len(tok))
    seen = []
    if lmbda > 0:  # keep the sampled sequences for the off-policy run
        sequences = method.sequences

        def recording(batch, **kw):
            out = sequences(batch, **kw)
            for ids, att, labels in zip(
                out["input_ids"], out["attention_mask"], out["labels"], strict=True
            ):
                n = int(att.sum())
                mask = [False, *(labels[: n - 1] != -100).tolist()]  # labels are shifted by one
                seen.append({"ids": ids[:n].tolist(), "mask": mask})
            return out

        method.sequences = recording
    logs, marks = [], []

    def on_log(row):
        logs.append(row)
        marks.append(time.perf_counter())

    train(recipe, method, student=student, tokenizer=tok, train_examples=examples,
          teacher=teacher, vocab_size=len(tok), on_log=on_log)  # fmt: skip
    if seen:
        with open(SEQUENCES, "w") as f:
            json.dump(seen, f)
    timed = logs[WARMUP:]
    tokens = logs[-1]["tokens"] - logs[WARMUP - 1]["tokens"]
    seconds = marks[-1] - marks[WARMUP - 1]
    out = {
        "seconds_per_step": seconds / len(timed),
        "tokens_per_step": tokens / len(timed),
        "tokens_per_s": tokens / seconds,
        "step_seconds": [
            round(b - a, 2) for a, b in zip(marks[WARMUP - 1 : -1], marks[WARMUP:], strict=True)
        ],
    }
    if lmbda > 0:
        out["sampling_seconds"] = [round(r["sequence_time_share"] * d, 2) for r, d in zip(
            timed, out["step_seconds"], strict=True)]  # fmt: skip
        out["sampling_share"] = sum(r["sequence_time_share"] for r in timed) / len(timed)
        out["sampled_len_mean"] = sum(r["student_sample_len_mean"] for r in timed) / len(timed)
        out["sampling_tokens_per_s"] = sum(r["student_sample_tokens_per_s"] for r in timed) / len(
            timed
        )
    return out


def run_trl(steps: int, precision: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tok = models()
    data = Dataset.from_list([{"messages": r["messages"]} for r in records(4 * steps)])
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    args = GKDConfig(
        output_dir="/tmp/trl-on-policy-bench", lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=128, max_length=256, per_device_train_batch_size=4, max_steps=steps,
        bf16=autocast_dtype(precision) is not None, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        learning_rate=5e-4, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    (t0, _), (t1, _) = marks[WARMUP - 1], marks[-1]
    return {"seconds_per_step": (t1 - t0) / (len(marks) - WARMUP)}


def run_sampling(precision: str) -> dict:
    import torch

    from potstill.data import batch_prompts, collate, tokenize_records
    from potstill.generation.base import SamplingParams
    from potstill.generation.hf import next_tokens, sample_seed
    from potstill.methods.on_policy import Sampler

    _, student, tok = models()
    examples, _ = tokenize_records(records(4), tok, max_length=256)
    prompts = batch_prompts(collate(examples, pad_token_id=tok.pad_token_id))
    params = SamplingParams(temperature=1.0, max_new_tokens=128, seed=1)
    cached_s = {}
    for compile in (False, True):
        sampler = Sampler(
            student, tok, dtype=autocast_dtype(precision), batch_size=4, compile=compile
        )
        sampler.sample(prompts, params)  # warm-up (and compilation)
        t0 = time.perf_counter()
        cached = sampler.sample(prompts, params)
        cached_s[compile] = time.perf_counter() - t0

    # The same sampling without a cache: every token re-reads the whole prefix.
    model, eos = sampler.backend.model, sampler.stop_ids
    gens = [torch.Generator().manual_seed(sample_seed(1, p, 0)) for p in prompts]
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    produced = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(128):
            live = [i for i, d in enumerate(done) if not d]
            if not live:
                break
            width = max(len(rows[i]) for i in live)
            ids = torch.full((len(live), width), tok.pad_token_id)
            mask = torch.zeros((len(live), width), dtype=torch.long)
            for j, i in enumerate(live):  # left padding
                ids[j, width - len(rows[i]) :] = torch.tensor(rows[i])
                mask[j, width - len(rows[i]) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = (
                model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                .logits[:, -1]
                .float()
            )
            chosen = next_tokens(logits, 1.0, 1.0, [gens[i] for i in live]).tolist()
            for i, token in zip(live, chosen, strict=True):
                rows[i].append(token)
                produced += 1
                done[i] = token in eos
    uncached_s = time.perf_counter() - t0
    cached_tokens = sum(len(c) for c in cached)
    return {
        "kv_cache_tokens_per_s": cached_tokens / cached_s[False],
        "compiled_kv_cache_tokens_per_s": cached_tokens / cached_s[True],
        "no_cache_tokens_per_s": produced / uncached_s,
        "tokens": cached_tokens,
    }


def worker(name: str, steps: int, precision: str, compile: bool) -> dict:
    if name == "potstill_on":
        return run_potstill(steps, 1.0, precision, compile)
    if name == "potstill_off":
        return run_potstill(steps, 0.0, precision, compile)
    if name == "trl":
        return run_trl(steps, precision)
    return run_sampling(precision)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="*", choices=NAMES, default=NAMES)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (2 are warm-up)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument(
        "--compile", choices=["on", "off"], default="on", help="on_policy.compile of the runs"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.precision, args.compile == "on")))
        return
    print(precision_note(args.precision) + f"; on_policy.compile {args.compile}", flush=True)
    results = {}
    for name in args.only:
        argv = ["--worker", name, "--steps", str(args.steps), "--precision", args.precision,
                "--compile", args.compile]  # fmt: skip
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        try:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(f"{name} failed: {proc.stderr.strip().splitlines()[-3:]}")
            continue
        print(f"{name}: {results[name]}", flush=True)
    print("\n| run | s/step | tokens/step | notes |\n|---|---:|---:|---|")
    on, off, trl = (results.get(k) for k in ("potstill_on", "potstill_off", "trl"))
    if on:
        print(
            f"| potstill on-policy (λ=1) | {on['seconds_per_step']:.2f} | "
            f"{on['tokens_per_step']:.0f} | sampling {on['sampling_share']:.0%} of the step, "
            f"{on['sampled_len_mean']:.0f} tokens/sample at {on['sampling_tokens_per_s']:.0f} "
            "tokens/s |"
        )
    if off:
        print(
            f"| potstill off-policy (λ=0), same sequences | {off['seconds_per_step']:.2f} | "
            f"{off['tokens_per_step']:.0f} | |"
        )
    if trl:
        print(f"| TRL GKDTrainer (lmbda=1) | {trl['seconds_per_step']:.2f} | | |")
    if on and off:
        equal = on["tokens_per_step"] / off["tokens_per_s"]  # off-policy s/step at on's tokens
        print(
            f"\non-policy step / off-policy step at equal tokens: "
            f"{on['seconds_per_step'] / equal:.2f}× (goal ≤ 1.5×)"
        )
    if on and trl:
        print(
            f"potstill on-policy steps/s ÷ TRL's: "
            f"{trl['seconds_per_step'] / on['seconds_per_step']:.2f}× (goal ≥ 1.5×)"
        )
    if s := results.get("sampling"):
        print(
            f"sampling, 4 × 128 tokens: KV cache {s['kv_cache_tokens_per_s']:.0f} tok/s, "
            f"compiled on a static KV cache {s['compiled_kv_cache_tokens_per_s']:.0f} tok/s, "
            f"no cache {s['no_cache_tokens_per_s']:.0f} tok/s "
            f"({s['kv_cache_tokens_per_s'] / s['no_cache_tokens_per_s']:.1f}×)"
        )


if __name__ == "__main__":
    main()
