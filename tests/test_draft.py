"""method draft: acceptance = 1 − TVD on crafted distributions, the expected tokens per target
pass against a brute-force simulation, the warm-up schedule, and a few steps on tiny models."""

from __future__ import annotations

import itertools

import pytest
import torch
from _tiny_recipe import tiny_recipe

from potstill.losses.acceptance import acceptance, expected_tokens_per_pass, greedy_acceptance
from potstill.losses.divergences import divergence


def test_acceptance_is_one_minus_tvd_on_crafted_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
    got = acceptance(p.log(), q.log())
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.7]))
    # and on random distributions, against the loss library's TVD
    torch.manual_seed(0)
    lp, lq = torch.randn(64, 50).log_softmax(-1), torch.randn(64, 50).log_softmax(-1)
    tvd = divergence(lq, lp, "tvd")  # (student log-probs, teacher log-probs)
    torch.testing.assert_close(acceptance(lp, lq), 1 - tvd, rtol=1e-5, atol=1e-6)
    assert greedy_acceptance(lp, lp).eq(1).all()


def test_acceptance_is_what_speculative_sampling_accepts():
    """Monte Carlo: draw x ~ q, accept with min(1, p(x)/q(x))."""
    torch.manual_seed(1)
    p, q = torch.randn(8).softmax(-1), torch.randn(8).softmax(-1)
    x = torch.multinomial(q, 200_000, replacement=True)
    accepted = torch.rand(x.shape) < (p[x] / q[x]).clamp(max=1)
    assert accepted.float().mean().item() == pytest.approx(
        acceptance(p.log()[None], q.log()[None]).item(), abs=4e-3
    )


def brute_force_tokens_per_pass(alpha: list[float], gamma: int) -> float:
    """Enumerate every accept/reject pattern of γ drafted tokens (independent, α_i each): the
    target yields the accepted prefix plus one token of its own."""
    expected = 0.0
    for pattern in itertools.product([True, False], repeat=gamma):
        prob, accepted = 1.0, 0
        for i, ok in enumerate(pattern):
            prob *= alpha[i] if ok else 1 - alpha[i]
        for ok in pattern:
            if not ok:
                break
            accepted += 1
        expected += prob * (accepted + 1)
    return expected


def test_expected_tokens_per_pass_matches_enumeration():
    alpha = torch.tensor([[0.9, 0.5, 0.7, 0.2, 0.8, 0.6]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    total, starts = expected_tokens_per_pass(alpha, mask, gamma=3)
    # starts 0, 1, 2 have three supervised positions ahead; 3 and 4 do not
    want = sum(brute_force_tokens_per_pass(alpha[0, t : t + 3].tolist(), 3) for t in range(3))
    assert starts.item() == 3 and total.item() == pytest.approx(want, rel=1e-6)
    # a perfect draft yields γ + 1 tokens per pass, a useless one 1
    ones = torch.ones(2, 10, dtype=torch.bool)
    assert expected_tokens_per_pass(torch.ones(2, 10), ones, 4)[0] / 14 == pytest.approx(5.0)
    assert expected_tokens_per_pass(torch.zeros(2, 10), ones, 4)[0] / 14 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gamma"):
        expected_tokens_per_pass(alpha, mask, 0)


def test_draft_warms_up_with_forward_kl_then_trains_tvd(tmp_path, smollm2_tokenizer, tiny_llama):
    from potstill.data import tokenize_records
    from potstill.methods import build_method
    from potstill.models import prune_layers
    from potstill.recipe import load_recipe
    from potstill.train import train

    tok = smollm2_tokenizer
    teacher = tiny_llama(len(tok), seed=1)
    records = [{"prompt": f"{a} plus {a} is", "completion": f" {2 * a}"} for a in range(12)]
    examples, _ = tokenize_records(records, tok, max_length=32)
    recipe = load_recipe(None, [
        "method=draft", "teacher.model=unused", "student.init=prune", "student.keep_layers=[0]",
        "draft.kl_warmup_steps=2", "draft.gamma=3", "train.max_steps=4", "train.batch_size=4",
        "train.lr=1e-2", "train.precision=fp32", "train.log_every=1", "train.save_every=0",
        f"train.output_dir={tmp_path}",
    ])  # fmt: skip
    method = build_method(recipe, vocab_size=len(tok))
    assert recipe.loss.kind == "tvd" and [method.kind_at(s) for s in range(4)] == [
        "forward_kl", "forward_kl", "tvd", "tvd",
    ]  # fmt: skip
    result = train(
        recipe, method, student=prune_layers(teacher, [0]).requires_grad_(True), tokenizer=tok,
        train_examples=examples, eval_examples=examples[:4], teacher=teacher,
        eval_teacher=teacher, vocab_size=len(tok),
    )  # fmt: skip
    soft = [r["soft"] for r in result.history if "soft" in r]
    assert len(soft) == 4 and all(0 <= s <= 1 for s in soft[2:])  # TVD lies in [0, 1]
    ev = result.eval
    assert 0 <= ev["acceptance"] <= 1 and 0 <= ev["acceptance_greedy"] <= 1
    assert 1 <= ev["tokens_per_pass_g3"] <= 4 and 1 <= ev["tokens_per_pass_greedy_g3"] <= 4


@pytest.mark.parametrize("source", ["cache", "server"])
def test_draft_needs_the_live_target(source):
    """A top-k cache or server would bound the draft's TVD from below, not measure it."""
    from potstill.errors import RecipeError
    from potstill.recipe import load_recipe

    with pytest.raises(RecipeError, match="draft"):
        load_recipe(None, [
            "method=draft", "teacher.model=t", f"teacher.source={source}",
            "teacher.cache=somewhere", "teacher.server_url=http://127.0.0.1:1/v1",
            "student.init=prune", "student.keep_layers=[0]",
        ])  # fmt: skip


def _negated_head_copy(model):
    """The model with its LM head negated (untied): its argmax is the target's argmin."""
    import copy

    other = copy.deepcopy(model)
    other.config.tie_word_embeddings = False
    other.lm_head = torch.nn.Linear(*reversed(model.lm_head.weight.shape), bias=False)
    with torch.no_grad():
        other.lm_head.weight.copy_(-model.lm_head.weight)
    return other.eval()


def test_speculative_decoding_is_lossless_and_counts_what_it_accepts(tiny_chat_lm):
    import copy

    from potstill.speculative import measure

    target, tokenizer = tiny_chat_lm
    prompts = [tokenizer(t)["input_ids"] for t in ("12+30=", "hello", "7*6=")]
    kw = {"gamma": 3, "max_new_tokens": 12, "pad_token_id": tokenizer.pad_token_id}
    perfect = measure(target, copy.deepcopy(target), prompts, **kw)
    # the target's own copy: every drafted token accepted, γ + 1 tokens per pass
    assert perfect["tokens_per_pass_greedy"] == pytest.approx(4.0)
    assert perfect["acceptance_greedy"] == pytest.approx(1.0)
    assert perfect["acceptance_t1"] == pytest.approx(1.0)
    useless = measure(target, _negated_head_copy(target), prompts, **kw)
    # a draft proposing the target's least likely token: all rejected, one token per pass
    assert useless["tokens_per_pass_greedy"] == pytest.approx(1.0)
    for result in (perfect, useless):  # lossless: the target's own greedy output either way
        assert result["identical_outputs"] == 1.0
        assert result["target_tokens_per_s"] > 0 and result["speedup"] > 0


def test_evaluate_speculative_reports_each_student_as_a_draft(tmp_path, tiny_pair_dirs, capsys):
    import json

    from potstill.cli import main

    rows = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(6) for b in (3, 7)]
    draft = "draft: {gamma: 2, eval_prompts: 3, eval_new_tokens: 6}\n"
    recipe = tiny_recipe(tmp_path, tiny_pair_dirs, rows, "draft", draft)
    report = tmp_path / "report.md"
    argv = ["evaluate", str(recipe), "--student", f"s={tiny_pair_dirs / 'student'}"]
    assert main([*argv, "--speculative", "--report", str(report)]) == 0
    text = report.read_text()
    assert "As speculative-decoding drafts (γ = 2" in text and "| s |" in text.split("drafts")[1]
    metrics = json.loads(report.with_suffix(".json").read_text())["students"]["s"]
    assert 1 <= metrics["tokens_per_pass_g2"] <= 3
    assert 1 <= metrics["spec_tokens_per_pass_greedy"] <= 3
    assert metrics["spec_identical_outputs"] == 1.0


def test_speedup_arithmetic_inverts():
    from potstill.speculative import largest_cost_ratio, predicted_speedup

    # a free draft and every token accepted: γ + 1 tokens per target pass
    assert predicted_speedup(5.0, 4, 0.0) == 5.0
    assert predicted_speedup(1.0, 4, 0.5) == pytest.approx(1 / 3)  # nothing accepted: slower
    ratio = largest_cost_ratio(2.0, 4, 1.3)
    assert predicted_speedup(2.0, 4, ratio) == pytest.approx(1.3)
    assert largest_cost_ratio(1.2, 4, 1.3) < 0  # too few tokens per pass for any draft


@pytest.mark.slow
def test_a_few_steps_of_the_draft_recipe_on_the_bundled_pair(tmp_path, smollm2_dir):
    import json
    import math

    from potstill.cli import main

    out = tmp_path / "run"
    args = [
        "train", "recipes/draft.yaml", f"teacher.model={smollm2_dir}", "train.max_steps=3",
        "draft.kl_warmup_steps=1", "train.batch_size=2", "data.max_length=96",
        "data.max_train_records=8", "data.max_eval_records=4", "train.precision=fp32",
        "train.save_every=0", "train.log_every=1", f"train.output_dir={out}",
        "draft.eval_prompts=2", "draft.eval_new_tokens=8",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    soft = [r["soft"] for r in rows if "soft" in r]
    assert len(soft) == 3 and soft[1] <= 1 and soft[2] <= 1  # TVD after the warm-up step
    assert math.isfinite(rows[-1]["eval/tokens_per_pass_g4"])
    assert rows[-1]["eval/tokens_per_pass_g4"] >= 1.0
    # the report card measures a draft run as a draft, with its recipe's draft settings
    card = tmp_path / "card.html"
    assert main(["report", str(out), "-o", str(card), "--no-generation", "--no-speed"]) == 0
    report = json.loads(card.with_suffix(".json").read_text())
    drafted = report["rows"]["run"]
    assert 0 <= drafted["acceptance"] <= 1 and drafted["spec_gamma"] == 4
    assert 1 <= drafted["spec_tokens_per_pass_greedy"] <= 5
    assert "acceptance" not in report["rows"]["teacher"]
    assert "## As speculative-decoding drafts" in card.with_suffix(".md").read_text()
