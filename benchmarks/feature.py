"""Feature distillation against logit KD alone, on the demo pair, in one process.

Trains the 6-layer pruned student from the bundled SmolLM2-135M-Instruct at an equal token budget
and seed three times — forward-KL logit KD alone (``recipes/token_level_forward_kl.yaml``), plus
the hidden-state term (``recipes/feature_hidden.yaml``), plus MiniLM-v2 attention relations
(``recipes/feature_attention.yaml``) — and measures each student against the live teacher on the
held-out set: teacher KL, top-1 agreement, perplexity; and training tokens/s.

    python benchmarks/feature.py                    # 40,000 tokens each
    python benchmarks/feature.py --tokens 80000 --hidden-weight 0.5 --attention-weight 2
"""

from __future__ import annotations

import argparse

import torch
from _pair import cpu_name, held_out, train_one  # the demo pair's helpers (benchmarks/_pair.py)

OUT = "runs/bench_feature"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=40_000, help="training budget per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--attention-weight", type=float, default=1.0)
    args = parser.parse_args()
    from potstill.models import load_model
    from potstill.recipe import load_recipe

    teacher = load_model("bundled:smollm2-135m-instruct").eval().requires_grad_(False)
    common = [
        f"train.max_tokens={args.tokens}", f"train.seed={args.seed}", "data.max_eval_records=48",
        f"data.max_train_records={max(64, args.tokens // 100)}", "train.eval_every=0",
        "train.save_every=0", "train.save_model=false", "train.resume=false",
    ]  # fmt: skip
    runs = {
        "logit KD (forward KL)": ("recipes/token_level_forward_kl.yaml", []),
        f"+ hidden states (mse, ×{args.hidden_weight})": (
            "recipes/feature_hidden.yaml", [f"feature.hidden_weight={args.hidden_weight}"]
        ),
        f"+ attention relations (×{args.attention_weight})": (
            "recipes/feature_attention.yaml",
            [f"feature.attention_weight={args.attention_weight}"],
        ),
    }  # fmt: skip
    rows = []
    for i, (name, (path, extra)) in enumerate(runs.items()):
        r = load_recipe(path, [*common, *extra, f"train.output_dir={OUT}/{i}"])
        models, data, result = train_one(r, teacher)
        metrics = held_out(models, data, r, teacher)
        rows.append((name, result, metrics))
    print(f"\nCPU: {cpu_name()}; torch {torch.__version__}; bf16 autocast where it is faster")
    print(f"{rows[0][1].steps} steps of a {args.tokens:,}-token budget, seed {args.seed}; "
          "held-out: 48 problems, against the live teacher\n")  # fmt: skip
    print("| objective | teacher KL | vs KD | top-1 | perplexity | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0][2]["teacher_kl"]
    for name, result, m in rows:
        print(f"| {name} | {m['teacher_kl']:.4f} | {100 * (m['teacher_kl'] / base - 1):+.2f}% | "
              f"{100 * m['top1_agreement']:.1f}% | {m['perplexity']:.2f} | "
              f"{result.tokens / result.seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
