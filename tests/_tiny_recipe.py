"""A recipe over the tiny teacher/student pair (the ``tiny_pair_dirs`` fixture) whose training and
held-out data are the same few rows, for commands that load models by path."""

import json
from pathlib import Path


def tiny_recipe(root: Path, pair: Path, rows: list[dict], method: str, extra: str = "") -> Path:
    """Write ``rows`` to ``root/eval.jsonl`` and a ``method`` recipe over them to ``root/r.yaml``
    (``extra``: more YAML lines); returns the recipe's path."""
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = root / "r.yaml"
    recipe.write_text(
        f"method: {method}\nteacher: {{model: {pair / 'teacher'}}}\n"
        f"student: {{model: {pair / 'student'}, init: pretrained}}\n"
        f"data: {{train: {data}, eval: {data}}}\n{extra}"
        "train: {precision: fp32}\n"
    )
    return recipe
