"""End-to-end tokens/s of token-level KD on the demo pair, potstill against TRL's GKDTrainer.

Teacher SmolLM2-135M-Instruct, student pruned to 6 layers, forward KL, batch 4, rows cut to 256
tokens, bundled gsm_symbolic chat data, same models and data for both, in one process each:
TRL's GKDTrainer with lmbda=0 (pure off-policy, i.e. token-level KD) and beta=0 (forward KL), and
potstill's trainer, at fp32 and at bf16 autocast. TRL runs twice: as it runs by default, and with
glibc keeping freed memory for reuse, which potstill's trainer sets on CPUs
(``train.keep_freed_memory``). Tokens/s counts non-padding input tokens over the timed steps
(the first steps, the warm-up, are excluded). Each framework runs ``--repeats`` times in
alternating rounds; the table gives its best run and every run. Also prints the share of the
bf16 matmul peak reached, counting 2·P_teacher + 6·P_student FLOPs per token (embeddings
excluded).

    python benchmarks/train_throughput.py                   # every framework, fp32 and bf16
    python benchmarks/train_throughput.py --only potstill --precision bf16
    python benchmarks/train_throughput.py --only potstill --precision fp32 --set train.padding_free=false
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _pair import models, records  # the demo pair (benchmarks/_pair.py)

STEPS, WARMUP = 12, 2  # warm-up steps include loss.compile's compilation
# trl_kept_memory: TRL in a process with glibc's freed memory kept for reuse, as potstill's trainer
# sets it (train.keep_freed_memory) — the same allocator for both, for a like-for-like figure.
NAMES = ["potstill", "potstill_compiled", "trl", "trl_kept_memory"]


def run_potstill(precision: str, compile_loss: bool = False, overrides: list[str] = ()) -> dict:
    from potstill.data import tokenize_records
    from potstill.methods import build_method
    from potstill.recipe import load_recipe
    from potstill.train import train

    teacher, student, tok = models()
    examples, _ = tokenize_records(records(4 * STEPS), tok, max_length=256)
    recipe = load_recipe(
        None,
        ["teacher.model=unused", "student.init=prune", "student.keep_layers=[0]",  # models passed in f"train.max_steps={STEPS}",
         "train.batch_size=4", f"train.precision={precision}", "train.log_every=1", "train.save_every=0",
         "train.save_model=false", "train.output_dir=/tmp/potstill-throughput", "train.resume=false",
         f"loss.compile={str(compile_loss).lower()}", *overrides],
    )  # fmt: skip
    rows = []
    t_marks = []

    def on_log(row):
        rows.append(row)
        t_marks.append(time.perf_counter())

    train(recipe, build_method(recipe, vocab_size=len(tok)), student=student, tokenizer=tok,
          train_examples=examples, teacher=teacher, vocab_size=len(tok), on_log=on_log)  # fmt: skip
    tokens = rows[-1]["tokens"] - rows[WARMUP - 1]["tokens"]
    seconds = t_marks[-1] - t_marks[WARMUP - 1]
    return {"tokens_per_s": tokens / seconds, "seconds_per_step": seconds / (STEPS - WARMUP)}


def run_trl(precision: str, keep_memory: bool = False) -> dict:
    if keep_memory:
        from potstill.utils import keep_freed_memory

        keep_freed_memory()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tok = models()
    data = Dataset.from_list([{"messages": r["messages"]} for r in records(4 * STEPS)])
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    args = GKDConfig(
        output_dir="/tmp/trl-throughput", lmbda=0.0, beta=0.0, temperature=1.0, max_length=256,
        per_device_train_batch_size=4, max_steps=STEPS, bf16=precision == "bf16", use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1000, include_num_input_tokens_seen="non_padding",
        learning_rate=5e-4, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[Clock()])  # fmt: skip
    trainer.train()
    (t0, n0), (t1, n1) = marks[WARMUP - 1], marks[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "seconds_per_step": (t1 - t0) / (STEPS - WARMUP)}


def peak_share(tokens_per_s: float) -> float:
    """Share of the bf16 matmul peak, from a large square matmul measured here."""
    import torch

    from potstill.models import count_parameters

    teacher, student, _ = models()
    emb = teacher.get_input_embeddings().weight.numel()
    flops_per_token = 2 * (count_parameters(teacher) - emb) + 6 * (count_parameters(student) - emb)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    peak = 10 * 2 * 2048**3 / (time.perf_counter() - t0)
    return flops_per_token * tokens_per_s / peak


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=NAMES)
    p.add_argument("--precision", nargs="*", default=["fp32", "bf16"])
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="recipe overrides for the potstill runs, e.g. train.padding_free=false",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=int, default=2,
        help="rounds over the frameworks (alternating); the table gives each one's best",
    )  # fmt: skip
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, precision = args.worker
        runs = {
            "potstill": lambda p: run_potstill(p, overrides=args.set),
            "potstill_compiled": lambda p: run_potstill(p, compile_loss=True, overrides=args.set),
            "trl": run_trl,
            "trl_kept_memory": lambda p: run_trl(p, keep_memory=True),
        }
        print(json.dumps(runs[name](precision)))
        return
    names = NAMES if not args.only else [args.only]
    print("| framework | precision | tokens/s | s/step | every run (tokens/s) |")
    print("|---|---|---:|---:|---|")
    best_bf16 = None
    for precision in args.precision:
        results: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeats):  # rounds alternate the frameworks: drift hits all alike
            for name in names:
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", name, precision, "--set", *args.set],
                    capture_output=True,
                    text=True,
                )
                try:
                    results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                except (IndexError, json.JSONDecodeError):
                    print(
                        f"| {name} | {precision} | failed: {proc.stderr.strip().splitlines()[-1:]} |"
                    )
        for name, runs in results.items():
            if not runs:
                continue
            best = max(runs, key=lambda r: r["tokens_per_s"])
            every = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            print(
                f"| {name} | {precision} | {best['tokens_per_s']:.0f} | "
                f"{best['seconds_per_step']:.2f} | {every} |",
                flush=True,
            )
            if name.startswith("potstill") and precision == "bf16":
                best_bf16 = max(best_bf16 or 0.0, best["tokens_per_s"])
    if best_bf16:
        print(
            f"\npotstill bf16 reaches {peak_share(best_bf16):.1%} of the measured bf16 matmul peak"
        )


if __name__ == "__main__":
    main()
