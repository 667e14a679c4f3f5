"""The demo pair and data every benchmark here runs on: SmolLM2-135M-Instruct as teacher, the same
model pruned to 6 of its 30 layers as student, bundled gsm_symbolic chat records; and the helpers
that train a recipe on it and measure the result."""

from __future__ import annotations

import platform
import subprocess


def models():
    """(teacher frozen in eval mode, student trainable, tokenizer)."""
    from potstill.models import load_model, load_tokenizer, prune_layers

    teacher = load_model("bundled:smollm2-135m-instruct").eval().requires_grad_(False)
    student = prune_layers(
        load_model("bundled:smollm2-135m-instruct"), [0, 6, 12, 18, 24, 29]
    ).requires_grad_(True)
    return teacher, student, load_tokenizer("bundled:smollm2-135m-instruct")


def records(n: int):
    """The first ``n`` bundled gsm_symbolic training records."""
    from potstill.data import load_records

    return load_records("bundled:rg/gsm_symbolic", limit=n)


def cpu_name() -> str:
    """The CPU's model name and the flags that decide bf16 speed, printed beside every figure."""
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


def train_one(r, teacher):
    """Train recipe ``r`` (reusing the loaded ``teacher`` where it has a live one) ->
    ``(models, data, TrainResult)``."""
    from potstill.methods import build_method
    from potstill.prepare import load_data, load_models
    from potstill.train import train

    models = load_models(r, teacher=teacher if r.teacher.source == "live" else None)
    method = build_method(r, vocab_size=models.vocab_size)
    method.bind(models.tokenizer, models.teacher_tokenizer)
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
