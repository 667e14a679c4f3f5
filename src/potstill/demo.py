"""``potstill demo``: the whole story of token-level KD on the bundled models, measured.

1) teacher SmolLM2-135M-Instruct; student = 6 of its 30 layers (~50M parameters);
2) held-out metrics of the pruned student before training;
3) forward-KL token-level KD for a fixed token budget;
4) a plain cross-entropy baseline from the same initialisation, same data, same budget;
5) ``report.md`` (table + loss curves PNG), ``metrics.json``, both students as HF model dirs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from potstill.evaluate import evaluate, verdict
from potstill.methods import build_method
from potstill.models import count_parameters
from potstill.prepare import load_data, load_models
from potstill.recipe import Recipe, load_recipe
from potstill.train import TrainResult, autocast_dtype, fixed_batches, pad_token_id, train
from potstill.utils import atomic_write, precision_note

# The demo's recipe; `potstill demo key=value ...` overrides any of it.
DEMO_OVERRIDES = [
    "method=token_level",
    "teacher.model=bundled:smollm2-135m-instruct",
    "teacher.dtype=float32",  # with bf16 autocast, faster than bf16 weights on CPU
    "student.init=prune",
    "student.keep_layers=[0, 6, 12, 18, 24, 29]",  # DistilBERT/Minitron-style depth pruning
    "data.train=bundled:rg/gsm_symbolic",  # worked grade-school maths, chat format
    "data.max_length=256",
    "data.max_eval_records=48",
    "loss.kind=forward_kl",
    "train.max_tokens=80000",  # the budget both students get (non-padding input tokens)
    "train.batch_size=4",
    "train.lr=5e-4",
    "train.warmup_steps=5",
    "train.eval_every=25",
    "train.save_every=50",
    "train.precision=auto",  # bf16 autocast where bf16 matmuls beat fp32 on this machine
]


def run_demo(
    out: str | Path = "runs/demo", overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    out = Path(out)
    started = time.perf_counter()
    kd = load_recipe(None, [*DEMO_OVERRIDES, f"train.output_dir={out / 'kd'}", *overrides])
    ce = dataclasses.replace(
        kd, method="sft", train=dataclasses.replace(kd.train, output_dir=str(out / "ce"))
    )

    models = load_models(kd)
    teacher, tokenizer = models.teacher, models.tokenizer
    init_student = copy.deepcopy(models.student)  # the CE baseline starts from the same weights
    data = load_data(kd, tokenizer)
    eval_batches = fixed_batches(
        data.eval, batch_size=kd.train.batch_size, pad_id=pad_token_id(tokenizer)
    )

    print("measuring the pruned student before training …")
    before = evaluate(
        init_student,
        eval_batches,
        teacher=teacher,
        vocab_size=models.vocab_size,
        autocast_dtype=autocast_dtype(kd.train.precision),
        progress=True,
    )
    results: dict[str, TrainResult] = {}
    for recipe, student in ((kd, models.student), (ce, init_student)):
        print(f"\n== {recipe.method}: {recipe.train.output_dir}")
        results[recipe.method] = train(
            recipe,
            build_method(recipe, vocab_size=models.vocab_size),
            student=student,
            tokenizer=tokenizer,
            train_examples=data.train,
            eval_examples=data.eval,
            teacher=teacher if recipe.method == "token_level" else None,
            eval_teacher=teacher,
            vocab_size=models.vocab_size,
        )

    metrics = {
        "teacher": {
            "model": kd.teacher.model,
            "parameters": count_parameters(teacher),
            "perplexity": before["teacher_perplexity"],
        },
        "student_init": {
            "parameters": count_parameters(init_student),
            "keep_layers": kd.student.keep_layers,
            **before,
        },
        "budget_tokens": kd.train.max_tokens,
        "eval_tokens": int(before["eval_tokens"]),
        "data": {
            "train": kd.data.train,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
        },
    }
    for name, label in (("token_level", "kd"), ("sft", "ce")):
        r = results[name]
        metrics[label] = {
            "method": name,
            "steps": r.steps,
            "tokens": r.tokens,
            "train_seconds": r.seconds,
            "tokens_per_s": r.tokens / max(r.seconds, 1e-9),
            "model_dir": str(r.model_dir),
            **(r.eval or {}),
        }
    metrics["total_seconds"] = time.perf_counter() - started
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    plot = _plot(results, before, out / "loss_curves.png")
    atomic_write(out / "report.md", _report(kd, metrics, plot.name))
    print(f"\nreport: {out / 'report.md'}\nmetrics: {out / 'metrics.json'}")
    print(
        f"students: {metrics['kd']['model_dir']} (KD), {metrics['ce']['model_dir']} (CE baseline)"
    )
    print(_table(metrics))
    print(verdict("The KD student", metrics["kd"], "the CE baseline", metrics["ce"]) + ".")
    return metrics


def _table(m: dict[str, Any]) -> str:
    rows = [
        ("teacher (SmolLM2-135M-Instruct)", m["teacher"]["parameters"], 0.0, 1.0, m["teacher"]["perplexity"]),
        ("student before training (pruned)", m["student_init"]["parameters"], m["student_init"]["teacher_kl"],
         m["student_init"]["top1_agreement"], m["student_init"]["perplexity"]),
        ("student after KD (forward KL)", m["student_init"]["parameters"], m["kd"]["teacher_kl"],
         m["kd"]["top1_agreement"], m["kd"]["perplexity"]),
        ("student after CE baseline", m["student_init"]["parameters"], m["ce"]["teacher_kl"],
         m["ce"]["top1_agreement"], m["ce"]["perplexity"]),
    ]  # fmt: skip
    lines = [
        "| model | parameters | teacher KL (nats/token) ↓ | top-1 agreement ↑ | perplexity ↓ |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, params, kl, top1, ppl in rows:
        lines.append(f"| {name} | {params / 1e6:.1f}M | {kl:.4f} | {top1:.1%} | {ppl:.2f} |")
    return "\n".join(lines)


def _report(r: Recipe, m: dict[str, Any], plot_name: str) -> str:
    kd, ce = m["kd"], m["ce"]
    return f"""# potstill demo: token-level distillation of SmolLM2-135M-Instruct

Teacher `{r.teacher.model}` → student pruned to layers {r.student.keep_layers}.
Training data `{r.data.train}` ({m["data"]["train_examples"]:,} examples, loss on assistant tokens
only, max {r.data.max_length} tokens); held-out: {m["data"]["eval_examples"]} unseen problems
({m["eval_tokens"]:,} supervised tokens). Both students get the same initialisation, data order and
budget: {kd["tokens"]:,} tokens in {kd["steps"]} steps (KD {kd["train_seconds"]:.0f} s, CE
{ce["train_seconds"]:.0f} s of training, {precision_note(r.train.precision)}).

{_table(m)}

{verdict("The KD student", kd, "the CE baseline", ce)}.

![loss curves]({plot_name})

Models: `{kd["model_dir"]}` (KD), `{ce["model_dir"]}` (CE baseline). Numbers: `metrics.json`.
Total wall time {m["total_seconds"]:.0f} s.
"""


def _plot(results: dict[str, TrainResult], before: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"token_level": "KD (forward KL)", "sft": "CE baseline"}
    for method, result in results.items():
        train_rows = [h for h in result.history if "loss" in h]
        eval_rows = [h for h in result.history if "eval/teacher_kl" in h]
        ax_loss.plot(
            [h["tokens"] for h in train_rows], [h["loss"] for h in train_rows], label=names[method]
        )
        xs = [0] + [h["tokens"] for h in eval_rows]
        ys = [before["teacher_kl"]] + [h["eval/teacher_kl"] for h in eval_rows]
        ax_kl.plot(xs, ys, marker="o", label=names[method])
    ax_loss.set(
        title="training loss (KD: KL to teacher; CE: cross-entropy)",
        xlabel="tokens",
        ylabel="nats/token",
    )
    ax_kl.set(title="held-out KL(teacher ‖ student)", xlabel="tokens", ylabel="nats/token")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
