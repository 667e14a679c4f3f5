"""potstill's command line: ``train``, ``check``, ``demo`` and ``keys``."""

from __future__ import annotations

import argparse
import sys
import textwrap

OVERRIDES_HELP = "dotted recipe keys to override, e.g. train.max_steps=2 loss.kind=reverse_kl"


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def cmd_train(args: argparse.Namespace) -> int:
    from potstill.methods import build_method
    from potstill.prepare import load_data, load_models
    from potstill.recipe import load_recipe
    from potstill.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    models = load_models(recipe)
    data = load_data(recipe, models.tokenizer)
    method = build_method(recipe, vocab_size=models.vocab_size)
    print(f"method: {recipe.method}; output: {recipe.train.output_dir}")
    result = train(
        recipe,
        method,
        student=models.student,
        tokenizer=models.tokenizer,
        train_examples=data.train,
        eval_examples=data.eval,
        teacher=models.teacher,
        vocab_size=models.vocab_size,
    )
    print(f"done: {result.steps} steps, {result.tokens:,} tokens")
    if result.eval:
        print("held-out: " + ", ".join(f"{k}={v:.4g}" for k, v in result.eval.items()))
    if result.model_dir:
        print(f"student saved to {result.model_dir}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from potstill.data import load_records, record_format
    from potstill.prepare import preflight
    from potstill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"recipe OK: method {recipe.method}")
    for key, value in preflight(recipe).items():
        print(f"  {key}: {value}")
    records = load_records(
        recipe.data.train, split=recipe.data.train_split, limit=recipe.data.max_train_records
    )
    formats = sorted({record_format(r) for r in records})
    print(f"  train data: {len(records):,} records ({', '.join(formats)}) from {recipe.data.train}")
    print("check passed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from potstill.demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from potstill.recipe import Recipe, all_keys

    defaults = Recipe().to_dict()
    for key, text in all_keys().items():
        node = defaults
        for part in key.split("."):
            node = node[part]
        print(f"{key} = {node!r}\n    {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potstill",
        description="Knowledge distillation for LLMs: a big teacher → a small, fast student.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              potstill demo                                   # the whole story on the bundled models
              potstill check recipes/token_level_forward_kl.yaml
              potstill train recipes/token_level_forward_kl.yaml train.max_steps=2
              potstill keys                                   # every recipe key with its meaning
            """
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "train", help="train a student as a recipe says", description="Train a student."
    )
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser(
        "check",
        help="validate a recipe and preflight models and data (no training)",
        description="Validate a recipe, compare teacher/student vocabularies and read the data; no weights load.",
    )
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser(
        "demo",
        help="distil the bundled SmolLM2 into a 6-layer student and report",
        description=(
            "SmolLM2-135M-Instruct teacher → 6-layer pruned student: forward-KL token-level KD and a "
            "same-budget cross-entropy baseline, measured on held-out data before and after."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("keys", help="list every recipe key with its default and meaning")
    p.set_defaults(fn=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from potstill.errors import USER_ERRORS

    try:
        return args.fn(args)
    except USER_ERRORS as e:  # expected, actionable failures: one line, no traceback
        print(f"potstill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
