"""The `generate` and `serve` commands: argument parsing, the generate recipes, recipe checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from potstill.cli import build_parser, cmd_generate, cmd_serve, main
from potstill.errors import RecipeError
from potstill.methods import METHODS
from potstill.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


def test_generate_and_serve_arguments():
    args = build_parser().parse_args(["generate", "r.yaml", "generate.n=2", "generate.seed=3"])
    assert (args.fn, args.recipe, args.overrides) == (cmd_generate, "r.yaml", ["generate.n=2", "generate.seed=3"])  # fmt: skip
    args = build_parser().parse_args(["serve", "bundled:smollm2-135m-instruct"])
    assert args.fn is cmd_serve
    assert (args.host, args.port, args.dtype, args.batch_size) == ("127.0.0.1", 8000, "float32", 16)
    args = build_parser().parse_args(
        ["serve", "m", "--host", "0.0.0.0", "--port", "9001", "--dtype", "bfloat16", "--batch-size", "4"]
    )  # fmt: skip
    assert (args.host, args.port, args.dtype, args.batch_size) == ("0.0.0.0", 9001, "bfloat16", 4)
    for argv in (["generate", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0


def test_serve_calls_potstill_serve(monkeypatch):
    import potstill.serve

    calls = []
    monkeypatch.setattr(potstill.serve, "serve", lambda model, **kw: calls.append((model, kw)))
    assert main(["serve", "./my-teacher", "--port", "9001", "--batch-size", "4"]) == 0
    assert main(["serve", "./my-teacher", "--api-key-env", "MY_KEY"]) == 0
    first = {"host": "127.0.0.1", "port": 9001, "dtype": "float32", "batch_size": 4}
    second = {"host": "127.0.0.1", "port": 8000, "dtype": "float32", "batch_size": 16}
    assert calls == [
        ("./my-teacher", {**first, "api_key_env": None}),
        ("./my-teacher", {**second, "api_key_env": "MY_KEY"}),
    ]


def test_keys_lists_the_generate_section(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for line in ("generate.prompts = 'bundled:rg/basic_arithmetic'", "generate.verify = 'auto'",
                 "generate.keep = 'all'", "generate.reasoning = 'none'", "generate.api_key_env = None"):  # fmt: skip
        assert line in out
    assert "sequence_level" in out  # in the method's documentation


@pytest.mark.parametrize("name", ["sequence_level.yaml", "cot_distill.yaml"])
def test_generate_recipes(name):
    text = (RECIPES / name).read_text()
    assert f"potstill generate recipes/{name}" in text and f"potstill train recipes/{name}" in text
    r = load_recipe(RECIPES / name)
    assert r.method == "sequence_level" and not METHODS[r.method].needs_teacher
    assert r.data.train == r.generate.output  # train reads what generate writes


def test_cot_recipe_samples_and_filters_into_a_full_depth_4_bit_student():
    r = load_recipe(RECIPES / "cot_distill.yaml")
    g = r.generate
    assert (g.n, g.verify, g.keep) == (8, "reasoning_gym", "first_correct") and g.temperature > 0
    assert g.prompts.startswith("bundled:rg/basic_arithmetic?")
    # pruned students lose the arithmetic (docs/methods/sequence_level.md): all the layers, 4-bit
    s = r.student
    assert (s.init, s.model, s.qat.format) == ("pretrained", r.teacher.model, "q4_0")
    assert r.train.precision == "fp32" and not s.keep_layers
    pruned = load_recipe(RECIPES / "sequence_level.yaml").student
    assert pruned.keep_layers == [0, 6, 12, 18, 24, 29]


@pytest.mark.slow
def test_the_cot_recipe_trains_its_4_bit_student_a_few_steps(tmp_path, smollm2_dir):
    """`potstill train recipes/cot_distill.yaml` as shipped (all 30 layers on the Q4_0 grid), on a
    few hand-written traces in place of generate's output: it trains, and what it saves is on
    the grid."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from potstill.quant import q4_0

    traces = tmp_path / "completions.jsonl"
    rows = [
        {"prompt": f"{a} + {b} =", "completion": f"{a} plus {b} is {a + b}. Answer: {a + b}"}
        for a, b in ((3, 4), (12, 9), (25, 17), (8, 30), (41, 6), (7, 7))
    ]
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = [
        "train", str(RECIPES / "cot_distill.yaml"), f"teacher.model={smollm2_dir}",
        f"student.model={smollm2_dir}", f"data.train={traces}", "data.max_eval_records=2",
        "train.max_steps=2", "train.batch_size=2", "train.eval_every=0", "train.save_every=0",
        f"train.output_dir={out}",
    ]  # fmt: skip
    assert main(args) == 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "grad_norm" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert saved.config.potstill_qat == "q4_0" and saved.config.num_hidden_layers == 30
    w = saved.model.layers[11].mlp.down_proj.weight.detach()
    assert torch.equal(q4_0(w), w)  # saved rounded: what llama.cpp will read


def test_train_before_generate_names_the_command(tmp_path, capsys):
    missing = tmp_path / "c.jsonl"
    recipe = RECIPES / "sequence_level.yaml"
    code = main(["train", str(recipe), f"generate.output={missing}", f"data.train={missing}"])
    assert code == 2
    assert f"run `potstill generate {recipe}` first" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["generate.keep=correct", "generate.verify=none"], "needs a verifier"),
        (["generate.n=4", "generate.temperature=0"], "identical greedy samples"),
        (["generate.api_key_env=sk-abc123"], "NAME of an environment variable"),
        (["generate.backend=ollama"], "must be one of hf, openai, vllm"),
        (["generate.verify=exact"], "`generate.verify` must be one of none, auto"),
        (["generate.reasoning=thinking"], "did you mean `think`"),
        (["generate.output=out.json"], "must be a .jsonl file"),
        (["generate.verfy=auto"], "did you mean `generate.verify`"),
    ],
)
def test_generate_section_is_validated(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "sequence_level.yaml", override)


def test_openai_backend_needs_url_model_and_key(monkeypatch):
    from potstill.generate import build_backend

    r = load_recipe(RECIPES / "sequence_level.yaml", ["generate.backend=openai"])
    with pytest.raises(RecipeError, match=r"needs `generate\.base_url`"):
        build_backend(r)
    monkeypatch.delenv("POTSTILL_TEST_KEY", raising=False)
    r = load_recipe(
        RECIPES / "sequence_level.yaml",
        [
            "generate.backend=openai",
            "generate.base_url=http://127.0.0.1:9/v1",
            "generate.model=teacher",
            "generate.api_key_env=POTSTILL_TEST_KEY",
        ],
    )
    with pytest.raises(RecipeError, match="names POTSTILL_TEST_KEY, which is not set"):
        build_backend(r)


def test_self_distill_recipe_is_the_model_learning_its_own_verified_samples():
    r = load_recipe(RECIPES / "self_distill.yaml")
    g = r.generate
    assert r.method == "sequence_level" and r.student.init == "pretrained"
    assert r.student.model == r.teacher.model  # no external teacher: a frozen copy writes
    assert g.temperature >= 1.0 and g.verify == "reasoning_gym" and g.keep == "correct"
    assert r.data.train == g.output


@pytest.mark.slow
def test_a_few_steps_of_self_distillation_on_the_bundled_model(tmp_path, smollm2_dir):
    """generate (its own samples, 3 problems × 2) then train (2 steps) the same model."""
    import json

    from potstill.cli import main

    common = [
        f"teacher.model={smollm2_dir}", f"student.model={smollm2_dir}",
        f"generate.output={tmp_path / 'own.jsonl'}", f"data.train={tmp_path / 'own.jsonl'}",
    ]  # fmt: skip
    gen = ["generate.max_prompts=3", "generate.n=2", "generate.max_new_tokens=24",
           "generate.keep=all"]  # fmt: skip
    assert main(["generate", "recipes/self_distill.yaml", *common, *gen]) == 0
    rows = [json.loads(x) for x in (tmp_path / "own.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("correct" in r for r in rows)
    train = ["train.max_steps=2", "train.batch_size=2", "data.max_eval_records=1",
             "train.precision=fp32", "train.save_every=0", f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["train", "recipes/self_distill.yaml", *common, *train]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
