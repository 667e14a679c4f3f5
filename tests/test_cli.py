"""The command line: every shipped recipe validates, `check` catches bad input with one clear
line, and `train` runs a few steps on the real bundled SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from potstill.cli import main
from potstill.errors import RecipeError
from potstill.recipe import load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
FORWARD = Path(__file__).parents[1] / "recipes" / "token_level_forward_kl.yaml"


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"token_level_forward_kl.yaml", "token_level_reverse_kl.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_documents_itself(path):
    recipe = load_recipe(path)
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment on what it does"
    assert f"potstill train recipes/{path.name}" in text, "and the command that runs it"
    assert recipe.train.output_dir.startswith("runs/")


def test_forward_and_reverse_recipes_differ_only_in_direction():
    fwd = load_recipe(FORWARD)
    rev = load_recipe(RECIPES[0].with_name("token_level_reverse_kl.yaml"))
    assert (fwd.loss.kind, rev.loss.kind) == ("forward_kl", "reverse_kl")
    assert fwd.student == rev.student and fwd.data == rev.data


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_keys_name_the_closest_spelling(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("method: token_level\ntraining:\n  lr: 1\n")
    code, _, err = run_cli(capsys, "check", str(bad))
    assert code == 2 and "unknown recipe key `training`; did you mean `train`?" in err
    code, _, err = run_cli(capsys, "check", str(FORWARD), "loss.kd_temprature=2")
    assert code == 2 and "did you mean `loss.kd_temperature`?" in err
    with pytest.raises(RecipeError, match="must be an integer"):
        load_recipe(None, ["train.max_steps=two"])
    with pytest.raises(RecipeError, match="precision` must be auto, fp32 or bf16"):
        load_recipe(FORWARD, ["train.precision=fp16"])
    assert load_recipe(FORWARD, ["train.max_steps=2"]).train.max_steps == 2  # wins over max_tokens


def test_missing_model_path(capsys):
    code, _, err = run_cli(capsys, "check", str(FORWARD), "teacher.model=./no/such/model")
    assert code == 2 and "no such model path" in err


@pytest.fixture
def tiny_dirs(tmp_path, smollm2_tokenizer):
    """Two model folders (config + tokenizer only): one sharing SmolLM2's vocabulary, one not."""
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    same, other = tmp_path / "same", tmp_path / "other"
    cfg.save_pretrained(same)
    smollm2_tokenizer.save_pretrained(same)
    cfg.save_pretrained(other)
    smollm2_tokenizer.save_pretrained(other)
    tok_file = other / "tokenizer.json"
    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    a, b = "hello", "Ġworld"  # swap two ids: same size, different mapping
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_file.write_text(json.dumps(data))
    return same, other


def test_mismatched_tokenizers_name_cross_tokenizer(tiny_dirs, capsys):
    same, other = tiny_dirs
    args = (
        "check",
        str(FORWARD),
        f"teacher.model={same}",
        f"student.model={other}",
        "student.init=pretrained",
    )
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "cross_tokenizer" in err and "hello" in err


def test_malformed_and_empty_data(tmp_path, tiny_dirs, capsys):
    same, _ = tiny_dirs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    base = ("check", str(FORWARD), f"teacher.model={same}", "student.keep_layers=[0, 1]")
    code, _, err = run_cli(capsys, *base, f"data.train={bad}")
    assert code == 2 and "bad.jsonl:2" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(capsys, *base, f"data.train={empty}")
    assert code == 2 and "no records" in err


def test_help_everywhere(capsys):
    for argv in (["--help"], ["train", "--help"], ["check", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage: potstill" in capsys.readouterr().out
    code, out, _ = run_cli(capsys, "keys")
    assert code == 0 and "loss.kind = None" in out and "on_policy.lmbda = 1.0" in out


@pytest.mark.slow
def test_check_and_train_on_bundled_smollm2(smollm2_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "check", str(FORWARD))
    assert code == 0 and "shared_vocab: 49152" in out and "check passed" in out
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(
        capsys, "train", str(FORWARD), "train.max_steps=2",
        "train.batch_size=2", "data.max_train_records=8", "data.max_eval_records=4", "data.max_length=96",
        f"train.output_dir={out_dir}",
    )  # fmt: skip
    assert code == 0, out
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/teacher_kl"] > 0 and all(r.get("loss", 1) > 0 for r in rows)
    assert (out_dir / "model" / "model.safetensors").is_file()
    assert "student saved to" in out


def test_overrides_may_follow_the_flags():
    from potstill.cli import parse

    args = parse(["evaluate", "r.yaml", "a.b=1", "--student", "d", "train.seed=2"])
    assert args.overrides == ["a.b=1", "train.seed=2"] and args.student == ["d"]
    for argv in (["evaluate", "r.yaml", "--student", "d", "--bogus"], ["keys", "x=1"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_keep_layers_beside_a_pretrained_student_is_named_unused(tiny_pair_dirs, capsys):
    from potstill.prepare import load_models

    pair = [f"teacher.model={tiny_pair_dirs / 'teacher'}", "student.keep_layers=[0, 1]"]
    pretrained = [f"student.model={tiny_pair_dirs / 'student'}", "student.init=pretrained"]
    load_models(load_recipe(FORWARD, [*pair, *pretrained]))
    assert "student.keep_layers [0, 1] is not used" in capsys.readouterr().out
    load_models(load_recipe(FORWARD, [*pair, "student.init=prune"]))
    assert "not used" not in capsys.readouterr().out
