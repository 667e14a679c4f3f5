"""`potstill evaluate`: student specs and the report table."""

from __future__ import annotations

import pytest
from _tiny_recipe import tiny_recipe

from potstill.compare import parse_students, report_markdown
from potstill.errors import RecipeError


def test_parse_students_names_and_checks_models(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got = parse_students([f"kd={tmp_path / 'a'}", str(tmp_path / "b")])
    assert got == {"kd": str(tmp_path / "a"), str(tmp_path / "b"): str(tmp_path / "b")}
    # any model a recipe takes: a bundled model (the untrained start) or a Hub id
    got = parse_students(["start=bundled:smollm2-135m-instruct", "org/name"])
    assert got == {"start": "bundled:smollm2-135m-instruct", "org/name": "org/name"}
    with pytest.raises(RecipeError, match=r"--student x=.*no such model path"):
        parse_students([f"x={tmp_path / 'missing'}"])
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"not a \.gguf file"):
        parse_students([str(tmp_path / "weights.bin")])


def test_report_has_a_row_per_student_and_the_teacher():
    result = {
        "teacher": {"model": "t", "parameters": 134.5e6, "perplexity": 3.57},
        "eval": {"source": "bundled:rg/gsm_symbolic", "examples": 48, "tokens": 4404},
        "students": {
            "token-level": {"parameters": 49.6e6, "teacher_kl": 1.795, "top1_agreement": 0.407,
                            "perplexity": 17.15},
            "sequence-level": {"parameters": 49.6e6, "teacher_kl": 2.5, "top1_agreement": 0.35,
                               "perplexity": 20.0},
        },
    }  # fmt: skip
    text = report_markdown(result)
    assert "| token-level | 49.6M | 1.795 | 40.7% | 17.15 |" in text
    assert (
        "| sequence-level |" in text and "| teacher (t) | 134.5M | 0.000 | 100.0% | 3.57 |" in text
    )
    assert "48 examples, 4,404 supervised tokens" in text
    # a computed verdict for each student after the first, against the first
    assert (
        "- sequence-level is worse than token-level on held-out teacher KL (2.500 vs 1.795), "
        "top-1 agreement (35.0% vs 40.7%) and perplexity (20.00 vs 17.15)." in text
    )
    del result["students"]["sequence-level"]
    assert "- " not in report_markdown(result)  # one student: nothing to compare


def test_report_adds_own_sample_columns_when_a_student_has_them():
    result = {
        "teacher": {"model": "t", "parameters": 134.5e6, "perplexity": 3.57},
        "eval": {"source": "s", "examples": 32, "tokens": 2944},
        "students": {
            "on": {"parameters": 49.6e6, "teacher_kl": 2.0, "top1_agreement": 0.4, "perplexity": 20.0,
                   "own_reverse_kl": 0.512, "own_sample_tokens": 97.2, "own_distinct_2": 0.834},
            "off": {"parameters": 49.6e6, "teacher_kl": 1.9, "top1_agreement": 0.41, "perplexity": 18.0,
                    "own_reverse_kl": 0.9, "own_sample_tokens": 128.0},
        },
    }  # fmt: skip
    text = report_markdown(result)
    assert "reverse KL on own samples" in text
    assert "| on | 49.6M | 2.000 | 40.0% | 20.00 | 0.512 | 0.83 | 97 |" in text
    assert "| off | 49.6M | 1.900 | 41.0% | 18.00 | 0.900 | — | 128 |" in text  # not measured
    del result["students"]["off"]["own_reverse_kl"]  # a column stays while any student has it
    assert "| off | 49.6M | 1.900 | 41.0% | 18.00 | — | — | 128 |" in report_markdown(result)
    for m in result["students"].values():
        m.pop("own_reverse_kl", None)
    assert "reverse KL on own samples" not in report_markdown(result)


def test_evaluate_prompts_scores_task_accuracy_as_the_report_card(tmp_path, tiny_pair_dirs):
    import json

    from potstill.cli import main

    rows = [
        {"prompt": f"{a}+{b}=", "completion": f" {a + b}", "answer": str(a + b)}
        for a in range(6)
        for b in (3, 7)
    ]
    recipe = tiny_recipe(tmp_path, tiny_pair_dirs, rows, "token_level")
    report = tmp_path / "report.md"
    argv = ["evaluate", str(recipe), "--student", f"s={tiny_pair_dirs / 'student'}",
            "--student", f"t={tiny_pair_dirs / 'teacher'}", "--report", str(report)]  # fmt: skip
    assert main([*argv, "--prompts", "5", "--max-new-tokens", "4"]) == 0
    students = json.loads(report.with_suffix(".json").read_text())["students"]
    for m in students.values():
        assert m["task_prompts"] == 5
        assert m["task_accuracy_greedy"] * 5 == pytest.approx(round(m["task_accuracy_greedy"] * 5))
        assert m["own_sample_tokens"] <= 4 and m["own_reverse_kl"] >= 0
    assert students["t"]["own_reverse_kl"] == pytest.approx(0, abs=1e-5)  # the teacher itself
    assert "accuracy greedy" in report.read_text()
    # with --own-samples the own-sample figures are the recipe's sampling's (2 new tokens here)
    own = [*argv, "on_policy.max_new_tokens=2", "--own-samples", "--prompts", "5"]
    assert main(own) == 0
    students = json.loads(report.with_suffix(".json").read_text())["students"]
    assert all(m["own_sample_tokens"] <= 2 and m["task_prompts"] == 5 for m in students.values())
    assert main(argv) == 0  # without --prompts: no generation
    assert (
        "task_accuracy_greedy"
        not in json.loads(report.with_suffix(".json").read_text())["students"]["s"]
    )


def test_evaluate_prompts_on_plain_text_says_what_to_drop(tmp_path, tiny_pair_dirs, capsys):
    from potstill.cli import main

    rows = [{"text": f"{a} plus {a} is {2 * a}."} for a in range(8)]
    recipe = tiny_recipe(tmp_path, tiny_pair_dirs, rows, "token_level")
    argv = ["evaluate", str(recipe), "--student", str(tiny_pair_dirs / "student")]
    assert main([*argv, "--prompts", "4"]) == 2
    assert "--prompts: the held-out records have no prompts" in capsys.readouterr().err


def test_evaluate_prompts_is_refused_across_tokenizers_before_loading_anything():
    from potstill.compare import compare_students
    from potstill.recipe import load_recipe

    r = load_recipe("recipes/cross_tokenizer_spans.yaml")
    with pytest.raises(RecipeError, match="--prompts is not measured for a cross_tokenizer"):
        compare_students(r, {"s": "no/such/model"}, prompts=4)  # loading would fail otherwise
