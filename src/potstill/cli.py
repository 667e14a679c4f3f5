"""potstill's command line: ``train``, ``check``, ``evaluate``, ``generate``, ``cache``,
``serve``, ``export``, ``report``, ``plan``, ``pick-layers``, ``demo`` and ``keys``."""

from __future__ import annotations

import argparse
import contextlib
import os
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
    _needs_generated_data(recipe, args.recipe)
    models = load_models(recipe)
    method = build_method(recipe, vocab_size=models.vocab_size)
    method.bind(models.tokenizer, models.teacher_tokenizer)
    data = load_data(recipe, models.tokenizer, method)
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
    if result.peak_memory_bytes:
        print(
            f"peak memory: {result.peak_memory_bytes / 2**30:.2f} GiB per process (the most any held)"
        )
    if result.model_dir:
        print(f"student saved to {result.model_dir}")
    return 0


def _waiting_for_generate(recipe) -> bool:
    """True when the training data is this recipe's `potstill generate` output, not written yet."""
    from pathlib import Path

    return recipe.data.train == recipe.generate.output and not Path(recipe.data.train).exists()


def _needs_generated_data(recipe, path: str) -> None:
    from potstill.errors import RecipeError

    if _waiting_for_generate(recipe):
        raise RecipeError(
            f"data.train {recipe.data.train} does not exist yet: "
            f"run `potstill generate {path}` first"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    from potstill.generate import run_generate
    from potstill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    report = run_generate(recipe)
    print(report.table())
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from potstill.cache import run_cache
    from potstill.recipe import load_recipe

    manifest = run_cache(load_recipe(args.recipe, args.overrides))
    splits = ", ".join(
        f"{name} {entry['positions']:,} positions in {len(entry['shards'])} shards"
        for name, entry in manifest["splits"].items()
    )
    print(
        f"teacher cache {args.recipe}: top-{manifest['top_k']} {manifest['dtype']} of "
        f"{manifest['teacher']['model']}; {splits}; "
        f"{manifest['bytes_per_position']:.1f} bytes/position"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from potstill.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        batch_size=args.batch_size,
        api_key_env=args.api_key_env,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from potstill.compare import run_compare
    from potstill.recipe import load_recipe

    run_compare(
        load_recipe(args.recipe, args.overrides),
        args.student,
        args.report,
        args.own_samples,
        args.speculative,
        args.prompts,
        args.max_new_tokens,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from potstill.metrics import Settings
    from potstill.report import build_report, print_summary

    settings = Settings(
        generation=args.generation,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        speed=args.speed,
        speculative=args.speculative,
        general=args.general,
        harness_tasks=tuple(t for t in (args.lm_eval or "").split(",") if t),
        harness_include=args.lm_eval_include,
        harness_limit=args.lm_eval_limit,
    )
    print_summary(build_report(args.runs, args.output, settings))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from potstill.data import load_records, record_format
    from potstill.prepare import preflight
    from potstill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"recipe OK: method {recipe.method}")
    for key, value in preflight(recipe).items():
        print(f"  {key}: {value}")
    if _waiting_for_generate(recipe):
        print(
            f"  train data: {recipe.data.train} not written yet (`potstill generate {args.recipe}`)"
        )
        print("check passed")
        return 0
    records = load_records(
        recipe.data.train, split=recipe.data.train_split, limit=recipe.data.max_train_records
    )
    formats = sorted({record_format(r) for r in records})
    print(f"  train data: {len(records):,} records ({', '.join(formats)}) from {recipe.data.train}")
    if recipe.data.eval:
        held = load_records(
            recipe.data.eval, split=recipe.data.eval_split, limit=recipe.data.max_eval_records
        )
        formats = sorted({record_format(r) for r in held})
        print(f"  eval data: {len(held):,} records ({', '.join(formats)}) from {recipe.data.eval}")
    print("check passed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from potstill.demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from potstill.errors import RecipeError
    from potstill.plan import make_plan
    from potstill.recipe import load_recipe

    if args.gpus and args.processes:
        raise RecipeError("give --gpus or --processes, not both")
    recipe = load_recipe(args.recipe, args.overrides)
    plan = make_plan(
        recipe,
        recipe_path=args.recipe,
        processes=args.gpus or args.processes or 1,
        engine=args.engine,
        device="gpu" if args.gpus else "cpu",
        memory_gb=args.gpu_memory,
        tflops=args.tflops,
    )
    print(plan.table())
    return 0


def cmd_pick_layers(args: argparse.Namespace) -> int:
    from potstill.layer_search import pick_layers
    from potstill.recipe import load_recipe

    pick_layers(load_recipe(args.recipe, args.overrides), args.layers, records=args.records)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from potstill.export import export_gguf

    done = export_gguf(args.model_dir, args.gguf, args.type)
    counts: dict[str, int] = {}
    for kind in done.tensor_types.values():
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(
        f"wrote {done.path} ({done.architecture}, {done.type}: {kinds}; {done.bytes / 2**20:.1f} MiB)"
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from potstill.recipe import Recipe, all_keys, value_at

    defaults = Recipe().to_dict()
    for key, text in all_keys().items():
        print(f"{key} = {value_at(defaults, key)!r}\n    {text}")
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
              potstill generate recipes/sequence_level.yaml   # teacher completions, then train
              potstill cache recipes/token_level_cached.yaml  # teacher top-k on disk, then train
              potstill report runs/demo/kd runs/demo/ce      # the report card of finished runs
              potstill plan recipes/token_level_forward_kl.yaml --gpus 8 --gpu-memory 80
              potstill pick-layers recipes/token_level_forward_kl.yaml --layers 6
              potstill serve bundled:smollm2-135m-instruct    # an OpenAI-compatible teacher
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
        "evaluate",
        help="saved students side by side on the recipe's held-out set, against its teacher",
        description=(
            "Teacher KL, top-1 agreement and perplexity of each --student on the recipe's "
            "held-out set (one tokenisation for all), e.g. a token-level and a sequence-level "
            "student trained at the same token budget; with --prompts, the accuracy of their "
            "answers to held-out problems too."
        ),
    )
    _add_recipe_args(p)
    p.add_argument(
        "--student",
        action="append",
        required=True,
        metavar="[NAME=]MODEL",
        help="a saved student (a train run's model/ folder) or any model a recipe takes (a .gguf "
        "file, bundled:NAME, a Hub id), e.g. the untrained start; repeat to compare several",
    )
    p.add_argument("--report", help="also write the table here (markdown; metrics as .json)")
    p.add_argument(
        "--own-samples",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also sample each student on the held-out prompts (the recipe's on_policy settings, "
        "same seeds for all) and report the reverse KL to the teacher on those samples; "
        "default: on for an on_policy recipe",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="also judge each student as a speculative-decoding draft for the teacher: expected "
        "acceptance from held-out TVD, then real decoding of draft.eval_prompts held-out prompts "
        "(tokens per target pass at greedy and T=1, tokens/s against the target alone, and "
        "whether greedy outputs are identical)",
    )
    p.add_argument(
        "--prompts",
        type=int,
        default=0,
        metavar="N",
        help="also complete the first N held-out prompts with each student, greedy and at T=1: "
        "task accuracy where the records carry a reference answer (as the report card scores "
        "it), and the sampled completions' reverse KL and diversity unless --own-samples is on "
        "(default: 0, none)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="per --prompts completion (default: 256)",
    )
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser(
        "report",
        help="the report card of finished runs: one HTML page (+ Markdown, JSON)",
        description=(
            "Measure finished runs on the first run's held-out set beside the teacher and the "
            "student before training: teacher KL both ways, top-1 agreement, perplexity, bits "
            "per byte, task accuracy from greedy and sampled answers (records with an answer), "
            "sample diversity, size, decoding speed, training cost; loss curves, held-out "
            "metrics over training, verdicts, the environment and every recipe."
        ),
    )
    p.add_argument(
        "runs", nargs="+", metavar="[NAME=]RUN_DIR", help="train.output_dir of finished runs"
    )
    p.add_argument(
        "-o",
        "--output",
        help="the HTML page; .md, .json and a _files/ folder beside it "
        "(default: report.html in the runs' common folder)",
    )
    p.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="complete held-out prompts greedy and at T=1: task accuracy, sample diversity, "
        "reverse KL on own samples (default: on)",
    )
    p.add_argument(
        "--prompts", type=int, default=48, help="held-out prompts completed (default: 48)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="per completion (default: 256)")
    p.add_argument(
        "--speed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure greedy decoding tokens/s, batch 1 and batched (default: on)",
    )
    p.add_argument(
        "--general",
        type=int,
        default=0,
        metavar="N",
        help="also measure the teacher KL on the first N held-out records of each kind of "
        "bundled:general text (prose, docs, code, maths): how general a copy each student is "
        "(default: 0, off)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="also measure every model as a speculative-decoding draft for the teacher "
        "(draft runs always are)",
    )
    p.add_argument(
        "--lm-eval",
        metavar="TASK[,TASK]",
        help="also run these lm-evaluation-harness tasks on every model (pip install "
        "'potstill[lmeval]')",
    )
    p.add_argument(
        "--lm-eval-include", metavar="DIR", help="a folder of custom harness task YAML files"
    )
    p.add_argument(
        "--lm-eval-limit", type=int, metavar="N", help="documents per harness task (default: all)"
    )
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser(
        "generate",
        help="write teacher completions for sequence-level / CoT distillation (resumable)",
        description=(
            "Generate teacher completions for the recipe's `generate` prompts, verify final "
            "answers, keep what `generate.keep` says, and write a JSONL that `potstill train` "
            "reads as data.train. Re-running the same command resumes."
        ),
    )
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser(
        "cache",
        help="write the teacher's top-k log-probabilities on the recipe's data (resumable)",
        description=(
            "Run the teacher over the recipe's training and held-out data and write its top-k "
            "log-probabilities at every supervised position to teacher.cache; train with "
            "teacher.source=cache to load no teacher. Re-running the same command resumes."
        ),
    )
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_cache)
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (Hub id, local dir, .gguf or bundled:NAME) over an "
        "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).",
    )
    p.add_argument("model", help="Hub id, local directory, .gguf file or bundled:NAME")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require the API key held by environment variable NAME (Authorization: Bearer "
        "<key>) on every endpoint but /health (default: no key)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="weights dtype (default: float32)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)"
    )
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser(
        "demo",
        help="distil the bundled SmolLM2 into a 6-layer student and report",
        description=(
            "SmolLM2-135M-Instruct teacher → 6-layer pruned student: forward-KL token-level KD and a "
            "same-budget cross-entropy baseline, ending in the report card of both (report.html)."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser(
        "export",
        help="write a saved student as a GGUF file for llama.cpp",
        description=(
            "Write MODEL_DIR (a train run's model/ folder, or any Llama-family / Qwen2 "
            "Hugging Face folder) as GGUF with its tokenizer and chat template. A student trained "
            "with student.qat exports to exactly the weights it trained with."
        ),
    )
    p.add_argument("model_dir", help="a Hugging Face model folder, e.g. runs/train/model")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument(
        "--type",
        choices=["f16", "q8_0", "q4_0"],
        default=None,
        help="weights format (default: the grid a QAT student trained on, else f16); q4_0 keeps "
        "the token embedding / output at q8_0 and norms at f32",
    )
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser(
        "plan",
        help="estimate a recipe's memory per process, disk and time before running it",
        description=(
            "Estimate what the recipe's run needs per process (runtime, student weights, "
            "gradients, AdamW states, teacher, activations, loss buffers), the disk its "
            "checkpoints and teacher cache take and the run's time, from configs and a sample of "
            "the data (no weights load); with --gpu-memory, say whether it fits and which knob "
            "to turn if not."
        ),
    )
    _add_recipe_args(p)
    p.add_argument(
        "--gpus", type=int, default=None, help="processes, one per GPU (default: 1 CPU process)"
    )
    p.add_argument(
        "--processes", type=int, default=None, help="CPU processes (default: 1; --gpus for GPUs)"
    )
    p.add_argument(
        "--engine", choices=["ddp", "fsdp2", "zero2", "zero3"], default="ddp", help="default: ddp"
    )
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU (GiB)")
    p.add_argument(
        "--tflops",
        type=float,
        help="sustained TFLOP/s per device for the time estimate (default: fp32 matmuls "
        "measured on this machine)",
    )
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser(
        "pick-layers",
        help="search which teacher layers a pruned student should keep (student.keep_layers)",
        description=(
            "Greedy search for student.init=prune: start from the first and last layer of the "
            "model the recipe prunes and add, one at a time, the layer that lowers the KL to the "
            "full model most on the first --records records of data.train. Prints each round and "
            "the pick as a student.keep_layers override."
        ),
    )
    _add_recipe_args(p)
    p.add_argument("--layers", type=int, required=True, help="how many layers the student keeps")
    p.add_argument(
        "--records", type=int, default=16, help="calibration records of data.train (default: 16)"
    )
    p.set_defaults(fn=cmd_pick_layers)
    p = sub.add_parser("keys", help="list every recipe key with its default and meaning")
    p.set_defaults(fn=cmd_keys)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; ``key=value`` overrides may also follow the flags
    (``evaluate R --student D train.seed=1``), where argparse alone would refuse them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _close_progress_bars() -> None:
    """Close the bars a failure left open (e.g. a library's, mid-write), so that the error
    starts a line of its own instead of running on after a bar's last frame."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from potstill.errors import USER_ERRORS

    try:
        if int(os.environ.get("RANK", "0")) > 0:  # launched processes: the first one reports
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return args.fn(args)
        return args.fn(args)
    except USER_ERRORS as e:  # expected, actionable failures: one line, no traceback
        message = " ".join(str(e).split())  # one line, whatever a library's text held
        _close_progress_bars()
        print(f"potstill {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
