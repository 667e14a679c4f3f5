"""``potstill demo``: the whole story of token-level KD on the bundled models, measured.

1) teacher SmolLM2-135M-Instruct; student = 6 of its 30 layers (~50M parameters);
2) forward-KL token-level KD for a fixed token budget;
3) a plain cross-entropy baseline from the same initialisation, same data, same budget;
4) the report card (:mod:`potstill.report`): ``report.html`` and ``report.md`` with the teacher,
   the pruned student and both trained students on the held-out set, their own answers scored,
   loss curves and verdicts; ``metrics.json``; both students as HF model dirs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from potstill.methods import build_method
from potstill.metrics import Settings
from potstill.prepare import load_data, load_models
from potstill.recipe import load_recipe
from potstill.report import build_report, print_summary
from potstill.train import TrainResult, train
from potstill.utils import atomic_write

# The demo's recipe; `potstill demo key=value ...` overrides any of it.
DEMO_OVERRIDES = [
    "method=token_level",
    "teacher.model=bundled:smollm2-135m-instruct",
    "teacher.dtype=float32",  # with bf16 autocast, faster than bf16 weights on CPU
    "student.init=prune",
    # depth pruning (DistilBERT, Minitron); the layers a greedy search on the teacher's KL picked
    # (benchmarks/keep_layers.py): KD from them ends at 1.21 nats/token, 1.79 from evenly spread
    "student.keep_layers=[0, 1, 15, 22, 24, 29]",
    "data.train=bundled:rg/gsm_symbolic",  # worked grade-school maths, chat format
    "data.max_length=256",
    "data.max_eval_records=48",
    "loss.kind=forward_kl",
    "train.max_tokens=80000",  # the budget both students get (non-padding input tokens)
    "train.batch_size=4",
    "train.lr=5e-4",
    "train.warmup_steps=5",
    "train.eval_every=50",  # held-out curve points; the report card measures the end again
    "train.save_every=50",
    "train.precision=auto",  # bf16 autocast where bf16 matmuls beat fp32 on this machine
]


# What the demo's report card measures: 8 held-out problems answered greedy and sampled (up to
# 192 tokens; the teacher's worked answers average ~125) keep the whole demo inside 15 minutes on
# a 2-core AVX2 CPU; `potstill report runs/demo/kd runs/demo/ce` measures all 48.
DEMO_REPORT = Settings(prompts=8, max_new_tokens=192)


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
    del models, init_student

    print("\n== the report card: every model on the held-out set, then its own answers")
    report = build_report(
        [f"KD={out / 'kd'}", f"CE baseline={out / 'ce'}"],
        out / "report.html",
        DEMO_REPORT,
        teacher=teacher,
    )
    rows = report["rows"]
    metrics = {
        "teacher": {"model": kd.teacher.model, **rows["teacher"]},
        "student_init": {"keep_layers": kd.student.keep_layers, **rows["before training"]},
        "budget_tokens": kd.train.max_tokens,
        "eval_tokens": report["eval"]["tokens"],
        "data": {
            "train": kd.data.train,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
        },
    }
    for name, label, row in (("token_level", "kd", "KD"), ("sft", "ce", "CE baseline")):
        r = results[name]
        metrics[label] = {
            "method": name,
            "steps": r.steps,
            "tokens": r.tokens,
            "train_seconds": r.seconds,
            "tokens_per_s": r.tokens / max(r.seconds, 1e-9),
            "model_dir": str(r.model_dir),
            **rows[row],
        }
    metrics["total_seconds"] = time.perf_counter() - started
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"\nreport card: {out / 'report.html'} (and report.md); numbers: {out / 'metrics.json'}")
    print(
        f"students: {metrics['kd']['model_dir']} (KD), {metrics['ce']['model_dir']} (CE baseline)"
    )
    print_summary(report)
    print(f"total wall time {metrics['total_seconds']:.0f} s")
    return metrics
