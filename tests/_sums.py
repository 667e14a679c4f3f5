"""Tiny addition problems as training and held-out JSONL, for runs that resume or get killed."""

import json
import random
from pathlib import Path


def write_sums(root: Path) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) under ``root``: 40 and 8 seeded "a+b=" prompt/completion pairs."""
    rng = random.Random(0)
    rows = [
        {"prompt": f"{a}+{b}=", "completion": str(a + b)}
        for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(48))
    ]
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    return train, held


def sft_recipe(root: Path, model, tokenizer, train: str) -> Path:
    """``root/sft.yaml``: SFT of ``model`` (saved with ``tokenizer`` to ``root/model``) on the sums,
    with ``train`` the recipe's train section as YAML flow pairs (precision fp32 added)."""
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_sums(root)
    recipe = root / "sft.yaml"
    recipe.write_text(
        f"method: sft\nstudent: {{model: {root / 'model'}, init: pretrained}}\n"
        f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}}}\n"
        f"train: {{{train}, precision: fp32}}\n"
    )
    return recipe
