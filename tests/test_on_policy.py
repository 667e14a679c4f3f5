"""On-policy distillation (method on_policy): prompts and completion masks, λ=0 equals token-level
KD exactly, seeded sampling, masking after the first stop id, the teacher never trains, the
reverse-KL monitor, the vLLM sampler against a stand-in, and a few steps on the bundled pair."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch

from potstill.data import batch_prompts, collate, completion_batch, cut_at_stop, tokenize_records
from potstill.errors import GenerationError, RecipeError
from potstill.generation.base import SamplingParams
from potstill.generation.hf import HFBackend
from potstill.losses import divergence
from potstill.losses.fused import fused_distill_sums
from potstill.methods import build_method
from potstill.models import prune_layers
from potstill.recipe import load_recipe
from potstill.train import train

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
        ]
    }
    for a, b in [(1, 2), (3, 4), (10, 7), (8, 8), (12, 30), (5, 9), (21, 21), (6, 1)]
]


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer, tiny_llama):
    tok = smollm2_tokenizer
    teacher = tiny_llama(len(tok), seed=1).requires_grad_(False)
    examples, _ = tokenize_records(RECORDS, tok, max_length=64)
    return tok, teacher, examples


def recipe(tmp_path, *overrides):
    return load_recipe(
        None,
        [
            "method=on_policy", "teacher.model=unused", "student.init=prune", "student.keep_layers=[0, 3]",
            f"train.output_dir={tmp_path}", "train.batch_size=2", "train.lr=1e-2", "train.warmup_steps=1",
            "train.precision=fp32", "train.log_every=1", "train.save_every=0", "train.save_model=false",
            "on_policy.max_new_tokens=6", *overrides,
        ],
    )  # fmt: skip


def run(tmp_path, setup, *overrides, eval_examples=None):
    tok, teacher, examples = setup
    r = recipe(tmp_path, *overrides)
    method = build_method(r, vocab_size=len(tok))
    student = prune_layers(teacher, [0, 3]).requires_grad_(True)
    result = train(
        r, method, student=student, tokenizer=tok, train_examples=examples, teacher=teacher,
        eval_examples=eval_examples, vocab_size=len(tok),
    )  # fmt: skip
    return result, student


# --- sequences: prompts, stop ids, completion masks --------------------------------------------


def test_prompts_are_the_tokens_before_the_first_supervised_one(setup):
    tok, _, examples = setup
    batch = collate(examples[:3], pad_token_id=tok.pad_token_id)
    for prompt, e in zip(batch_prompts(batch), examples[:3], strict=True):
        first = e.target_mask.index(True)
        assert prompt == e.input_ids[:first]
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_cut_at_stop_keeps_the_first_stop_id_and_drops_the_rest():
    assert cut_at_stop([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert cut_at_stop([5, 9, 6, 2], {2, 9}) == [5, 9]  # several stop ids: the first one wins
    assert cut_at_stop([5, 6], {2}) == [5, 6]  # cut by length: nothing to drop


def test_completion_batch_supervises_only_the_completion():
    batch = completion_batch([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    # labels[t] is token t+1; only completion tokens are targets, padding is ignored
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100], [9, 10, 11, -100, -100]]


def test_generate_ids_is_what_generate_writes(tiny_chat_lm):
    model, tok = tiny_chat_lm
    backend = HFBackend(model, tok, batch_size=3)
    prompts = [[{"role": "user", "content": c}] for c in ("hi", "a longer one", "x")]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    texts = backend.generate(prompts, params)
    ids = backend.generate_ids([backend.prompt_token_ids(p) for p in prompts], params)
    for (c,), (sample,) in zip(texts, ids, strict=True):
        body = sample[:-1] if sample[-1] in backend.eos_ids else sample
        assert tok.decode(body, skip_special_tokens=True) == c.text
        assert len(sample) == c.num_tokens


def test_a_qat_student_rounds_its_weights_once_per_sampling_call(tiny_chat_lm, monkeypatch):
    from potstill import students
    from potstill.methods.on_policy import Sampler

    model, tok = tiny_chat_lm
    student = copy.deepcopy(model)
    students.add_qat(student, "q8_0")
    grids = sum(1 for m in student.modules() if isinstance(m, students._Grid))
    calls, grid_forward = [0], students._Grid.forward

    def counted(self, weight):
        calls[0] += 1
        return grid_forward(self, weight)

    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    prompts = [[5, 6, 7], [8, 9]]
    sampler = Sampler(student, tok, dtype=None)
    # the same samples as with the weights rounded at every forward pass (no cache)
    expected = [
        cut_at_stop(s[0], sampler.stop_ids) for s in sampler.backend.generate_ids(prompts, params)
    ]
    monkeypatch.setattr(students._Grid, "forward", counted)
    got = sampler.sample(prompts, params)
    assert 0 < calls[0] <= grids  # not once per decoded token
    assert got == expected
    assert max(len(s) for s in got) > 1 and student.training is model.training


# --- the method -------------------------------------------------------------------------------


def test_lambda_zero_is_token_level_kd_exactly(tmp_path, setup):
    """λ=0 without seq_kd: no sampling, and the same loss, gradients and weights as token_level."""
    steps = ["train.max_steps=3", "loss.kind=reverse_kl"]
    _, on = run(tmp_path / "on", setup, "on_policy.lmbda=0", *steps)
    assert_trains_as_token_level(tmp_path / "tl", setup, on, setup[2], steps)


def assert_trains_as_token_level(tmp_path, setup, trained, examples, steps):
    """``trained`` holds exactly the weights token-level KD reaches on ``examples``."""
    tok, teacher, _ = setup
    r = recipe(tmp_path, "method=token_level", *steps)
    student = prune_layers(teacher, [0, 3]).requires_grad_(True)
    train(r, build_method(r, vocab_size=len(tok)), student=student, tokenizer=tok,
          train_examples=examples, teacher=teacher, vocab_size=len(tok))  # fmt: skip
    for (name, a), b in zip(
        trained.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_sampling_is_seeded_and_masked_after_the_first_stop_id(tmp_path, setup):
    tok, teacher, examples = setup
    stop = list(range(0, len(tok), 7))  # every 7th id ends a completion: most samples stop early
    r = recipe(tmp_path, f"on_policy.stop_token_ids={stop}", "on_policy.max_new_tokens=12")
    method = build_method(r, vocab_size=len(tok))
    student = prune_layers(teacher, [0, 3])
    batch = collate(examples[:4], pad_token_id=tok.pad_token_id)
    kw = dict(student=student, teacher=teacher, tokenizer=tok)
    a = method.sequences(batch, step=3, index=0, **kw)
    b = method.sequences(batch, step=3, index=0, **kw)
    c = method.sequences(batch, step=4, index=0, **kw)
    assert torch.equal(a["input_ids"], b["input_ids"])  # same (seed, step, index): same samples
    assert not torch.equal(a["input_ids"], c["input_ids"])  # another step draws anew
    assert a["sampled_by_student"].tolist() == [True] * 4  # every row is the student's
    stops = set(stop) | {tok.eos_token_id}
    prompts = batch_prompts(batch)
    stopped = 0
    for row, prompt in enumerate(prompts):
        labels = a["labels"][row]
        completion = labels[labels != -100].tolist()
        assert a["input_ids"][row, : len(prompt)].tolist() == prompt  # the prompt is kept ...
        assert (labels[: len(prompt) - 1] == -100).all()  # ... and never scored
        assert 1 <= len(completion) <= 12
        assert not stops & set(completion[:-1])  # nothing is scored after a stop id
        stopped += completion[-1] in stops
    assert stopped >= 2  # the test saw samples end at a stop id


def test_teacher_never_trains_and_the_log_has_the_sampling_figures(tmp_path, setup):
    _, teacher, examples = setup
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result, _ = run(tmp_path, setup, "train.max_steps=2", eval_examples=examples[:2])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    row = result.history[0]
    assert row["on_policy_fraction"] == 1.0
    assert 1 <= row["student_sample_len_mean"] <= row["student_sample_len_max"] <= 6
    assert 0 < row["sequence_time_share"] < 1
    assert row["own_reverse_kl"] == pytest.approx(row["soft"], rel=1e-5)  # reverse KL at T=1
    assert result.eval["own_reverse_kl"] > 0 and 1 <= result.eval["own_sample_tokens"] <= 6
    distinct, repeated = result.eval["own_distinct_2"], result.eval["own_repetition"]
    assert 0 < distinct <= 1 and (math.isnan(repeated) or 0 <= repeated < 1)  # ≤ 6 tokens each


def test_lambda_mixes_batches_and_seq_kd_lets_the_teacher_write(tmp_path, setup):
    result, _ = run(tmp_path / "a", setup, "train.max_steps=8", "on_policy.lmbda=0.5")
    fractions = [r["on_policy_fraction"] for r in result.history if "loss" in r]
    assert set(fractions) == {0.0, 1.0}  # one micro-batch per step: some sampled, some not
    result, _ = run(
        tmp_path / "b", setup, "train.max_steps=2", "on_policy.lmbda=0", "on_policy.seq_kd=true"
    )
    row = result.history[0]
    assert row["on_policy_fraction"] == 0.0 and 1 <= row["teacher_sample_len_mean"] <= 6


def test_the_collapse_guard_counts_collapsed_batches_in_a_row():
    from potstill.methods.on_policy import OnPolicy

    guard = OnPolicy(collapse_patience=2)
    collapsed = [[5, 6] * 20, [6, 5] * 20]  # "ededed…": distinct-2 2/78, repetition ~1
    varied = [list(range(0, 40)), list(range(50, 90))]
    guard.watch_diversity(collapsed)
    assert guard.stop_reason() is None  # one batch is not yet a collapse
    guard.watch_diversity(varied)
    guard.watch_diversity(collapsed)
    assert guard.stop_reason() is None  # a healthy batch in between starts the count again
    guard.watch_diversity(collapsed)
    reason = guard.stop_reason()
    assert "2 sampled batches in a row" in reason and "distinct-2 0.026" in reason
    for knob in ("student.init=pretrained", "train.lr", "on_policy.lmbda", "collapse_patience=0"):
        assert knob in reason
    stats = guard.pop_stats()
    assert stats["student_distinct_2"] == pytest.approx((3 * 2 / 78 + 1.0) / 4)
    assert stats["student_repetition"] > 0.7
    guard.watch_diversity([[1, 2], [3]])  # too short for a 4-gram: repetition NaN, not counted
    assert guard.collapsed == 0
    assert OnPolicy(collapse_patience=0, collapsed=9).stop_reason() is None  # only logs


def test_a_collapsed_run_stops_before_the_next_step_and_names_the_knobs(
    tmp_path, setup, monkeypatch
):
    from potstill.errors import RunStopped
    from potstill.methods import on_policy

    monkeypatch.setattr(on_policy, "distinct_n", lambda samples, n: 0.0)  # every batch collapsed
    with pytest.raises(RunStopped, match=r"stopped at step 2: the student's own samples collapsed"):
        run(tmp_path, setup, "train.max_steps=5", "on_policy.collapse_patience=2")
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["student_distinct_2"] == 0.0


def test_sampling_from_an_untrained_student_is_warned_about():
    warm = load_recipe(None, ["method=on_policy", "teacher.model=t", "student.model=s",
                              "student.init=pretrained"])  # fmt: skip
    cold = load_recipe(None, ["method=on_policy", "teacher.model=t", "student.init=prune",
                              "student.keep_layers=[0]"])  # fmt: skip
    assert "warning" in build_method(cold, vocab_size=8).describe()
    assert "warning" not in build_method(warm, vocab_size=8).describe()
    off = load_recipe(None, ["method=on_policy", "teacher.model=t", "student.init=prune",
                             "student.keep_layers=[0]", "on_policy.lmbda=0"])  # fmt: skip
    assert "warning" not in build_method(off, vocab_size=8).describe()


def test_the_sampled_estimator_is_the_full_reverse_kl_gradient_in_expectation():
    """Per position: Σ_y q(y) ∇surrogate(y) over every token y equals ∇ KL(q ‖ p) exactly, and
    the surrogate's value at y is log q(y) − log p(y)."""
    from potstill.losses import sampled_reverse_kl

    torch.manual_seed(0)
    s_logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)  # (N, V)
    t_logits = torch.randn(3, 7, dtype=torch.float64)
    full = divergence(s_logits, t_logits, "reverse_kl").sum()
    (want,) = torch.autograd.grad(full, s_logits)
    q = s_logits.softmax(-1).detach()
    got = torch.zeros_like(s_logits)
    for y in range(7):
        tokens = torch.full((3,), y)
        lq = s_logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        lp = t_logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        value = sampled_reverse_kl(lq, lp)
        assert torch.allclose(value, (lq - lp).detach())
        (g,) = torch.autograd.grad(value.sum(), s_logits)
        got += q[:, y : y + 1] * g  # weight each row's gradient by that row's q(y)
    assert torch.allclose(got, want, atol=1e-12)


def own_batch_loss(setup, **kw):
    """OnPolicy(**kw)'s loss on a batch the student sampled, run backward: (student, teacher,
    batch, method, sums, its gradients by name, both models' full (B, T, V) log-probabilities,
    the student's differentiable, its gradients zeroed for a reference to fill)."""
    from potstill.methods.on_policy import OnPolicy
    from potstill.methods.token_level import TokenLevel

    tok, teacher, examples = setup
    student = prune_layers(teacher, [0, 3]).requires_grad_(True)
    batch = collate(examples[:3], pad_token_id=tok.pad_token_id)
    batch["sampled_by_student"] = torch.tensor(True)
    method = OnPolicy(kd=TokenLevel(kind="reverse_kl", vocab_size=len(tok)), **kw)
    sums = method.loss(student, teacher, batch)
    sums.loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    s_lp = student(batch["input_ids"]).logits.float().log_softmax(-1)  # (B, T, V)
    with torch.no_grad():
        t_lp = teacher(batch["input_ids"]).logits.float().log_softmax(-1)
    return student, teacher, batch, method, sums, got, s_lp, t_lp


def assert_grads_match(student, got):
    for name, p in student.named_parameters():
        scale = p.grad.abs().max()  # fp32 sums of signed terms: compare against the largest
        assert (got[name] - p.grad).abs().max() <= 1e-4 * scale, name


def test_the_sampled_estimator_matches_a_naive_reference_on_a_tiny_model(setup):
    """OnPolicy's sampled loss on a student-written batch (chunked, recomputed log-probs) has
    the loss and gradients of the plain computation from full logits."""
    from potstill.losses import sampled_reverse_kl

    student, teacher, batch, method, sums, got, s_lp, t_lp = own_batch_loss(
        setup, estimator="sampled"
    )
    labels = batch["labels"]  # (B, T), already shifted: position t predicts token t+1
    mask = labels != -100
    s_lp, t_lp = s_lp[mask], t_lp[mask]  # (N, V)
    y = labels[mask]
    ref = sampled_reverse_kl(s_lp.gather(-1, y[:, None])[:, 0], t_lp.gather(-1, y[:, None])[:, 0])
    ref.sum().backward()
    assert sums.loss.item() == pytest.approx(ref.sum().item(), rel=1e-4, abs=1e-5)
    assert sums.terms["soft"].item() == pytest.approx(ref.sum().item(), rel=1e-4, abs=1e-5)
    assert max(p.grad.abs().max() for p in student.parameters()) > 0
    assert_grads_match(student, got)
    # data batches (λ < 1) keep the full-vocabulary objective
    batch["sampled_by_student"] = torch.tensor(False)
    full = method.loss(student, teacher, batch)
    assert full.terms["soft"].item() != pytest.approx(sums.terms["soft"].item())


def test_a_few_steps_with_the_sampled_estimator(tmp_path, setup):
    result, _ = run(tmp_path, setup, "train.max_steps=2", "on_policy.estimator=sampled")
    row = result.history[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert row["own_reverse_kl"] == pytest.approx(row["soft"], rel=1e-5)
    with pytest.raises(RecipeError, match=r"loss\.kind=reverse_kl"):
        recipe(tmp_path, "on_policy.estimator=sampled", "loss.kind=forward_kl")
    with pytest.raises(RecipeError, match="full or sampled"):
        recipe(tmp_path, "on_policy.estimator=k3")


def test_later_mean_averages_or_sums_the_later_masked_positions():
    from potstill.losses import later_mean

    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 7.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, True, False], [True, False, True, False, False]])
    mean = later_mean(values, mask)
    assert mean[0, 1:4].tolist() == [3.5, 4.0, 0.0] and mean[1, 0].item() == 1.0
    assert mean[1, 2].item() == 0.0  # nothing after the last scored token
    total = later_mean(values, mask, normalise=False)
    assert total[0, 1:4].tolist() == [7.0, 4.0, 0.0] and total[1, 0].item() == 1.0


@pytest.mark.parametrize(
    ("estimator", "length_norm"), [("full", True), ("sampled", True), ("full", False)]
)
def test_sequence_credit_matches_a_naive_reference_on_a_tiny_model(setup, estimator, length_norm):
    """With on_policy.credit=sequence each sampled token's log-probability also carries the mean
    (or sum) of the sampled reverse KL of the later tokens of its own sample: loss, logged terms
    and gradients equal a per-sample loop over full logits."""
    from potstill.losses import sampled_reverse_kl

    student, teacher, batch, method, sums, got, s_lp, t_lp = own_batch_loss(
        setup, estimator=estimator, credit="sequence", length_norm=length_norm
    )
    labels = batch["labels"]  # (B, T)
    soft = long = 0.0
    for b in range(labels.shape[0]):  # one sample at a time, its scored tokens in order
        where = (labels[b] != -100).nonzero()[:, 0]
        y = labels[b, where]
        lq = s_lp[b, where].gather(-1, y[:, None])[:, 0]  # (n,)
        lp = t_lp[b, where].gather(-1, y[:, None])[:, 0]
        if estimator == "sampled":
            soft = soft + sampled_reverse_kl(lq, lp).sum()
        else:
            soft = soft + divergence(s_lp[b, where], t_lp[b, where], "reverse_kl").sum()
        cost = (lq - lp).detach()
        for t in range(len(y) - 1):
            later = cost[t + 1 :].sum() / (len(y) - 1 - t if length_norm else 1)
            long = long + later * (lq[t] - lq[t].detach()) + later
    (soft + long).backward()
    assert sums.terms["long"].item() == pytest.approx(long.item(), rel=1e-4, abs=1e-5)
    assert sums.loss.item() == pytest.approx((soft + long).item(), rel=1e-4, abs=1e-5)
    assert all(p.grad.abs().max() > 0 for p in student.parameters())
    assert_grads_match(student, got)
    # a data batch (λ < 1) logs a zero long-term term, so every micro-batch has the same terms
    batch["sampled_by_student"] = torch.tensor(False)
    assert method.loss(student, teacher, batch).terms["long"].item() == 0.0


def test_a_few_steps_with_sequence_credit(tmp_path, setup):
    result, _ = run(tmp_path, setup, "train.max_steps=2", "on_policy.credit=sequence")
    row = result.history[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["long"]) and row["long"] != 0
    assert row["loss"] == pytest.approx(row["soft"] + row["long"], rel=1e-5)
    with pytest.raises(RecipeError, match=r"on_policy\.teacher_mix=0"):
        recipe(tmp_path, "on_policy.credit=sequence", "on_policy.teacher_mix=0.2")
    with pytest.raises(RecipeError, match="token or sequence"):
        recipe(tmp_path, "on_policy.credit=episode")


# --- MiniLLM's teacher-mixed sampling ------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_teacher_mixed_sampling_draws_from_the_mixture(tiny_chat_lm, alpha):
    """The logits the backend samples at T are exactly the mixture (1 − α)·q_T + α·p_T."""
    model, tok = tiny_chat_lm
    guide = copy.deepcopy(model)
    with torch.no_grad():
        guide.lm_head.weight.mul_(-3.0)  # a guide that disagrees
    backend = HFBackend(model, tok, guide=guide, guide_weight=alpha)
    q, p = torch.randn(3, 40), torch.randn(3, 40)
    for t in (0.7, 1.0, 1.5):
        mixed = backend._mixed(q, p, t)  # what next_tokens divides by t and samples
        naive = (1 - alpha) * torch.softmax(q / t, -1) + alpha * torch.softmax(p / t, -1)
        torch.testing.assert_close(torch.softmax(mixed / t, -1), naive)
    # the decode runs both caches row for row; a guide that is the model itself changes nothing
    prompts = [backend.prompt_token_ids([{"role": "user", "content": c}]) for c in ("hi", "a b c")]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    alone = HFBackend(model, tok).generate_ids(prompts, params)
    assert (
        HFBackend(model, tok, guide=model, guide_weight=alpha).generate_ids(prompts, params)
        == alone
    )
    mixed_ids = backend.generate_ids(prompts, params)
    assert mixed_ids != alone and all(1 <= len(s[0]) <= 10 for s in mixed_ids)
    with pytest.raises(GenerationError, match="guide_weight"):
        HFBackend(model, tok, guide_weight=0.5)


def test_a_few_steps_with_teacher_mixed_sampling(tmp_path, setup):
    tok, teacher, examples = setup
    r = recipe(tmp_path, "on_policy.teacher_mix=0.5")
    method = build_method(r, vocab_size=len(tok))
    assert "teacher-mixed α=0.5" in method.describe()
    student = prune_layers(teacher, [0, 3])
    batch = collate(examples[:4], pad_token_id=tok.pad_token_id)
    kw = dict(student=student, teacher=teacher, tokenizer=tok, step=1, index=0)
    mixed = method.sequences(batch, **kw)["input_ids"]
    alone = build_method(recipe(tmp_path), vocab_size=len(tok)).sequences(batch, **kw)["input_ids"]
    assert not torch.equal(mixed, alone)  # the same draws, another distribution
    result, _ = run(tmp_path / "run", setup, "train.max_steps=2", "on_policy.teacher_mix=0.5",
                    eval_examples=examples[:2])  # fmt: skip
    assert math.isfinite(result.history[0]["loss"]) and result.eval["own_reverse_kl"] > 0
    for bad, match in (("on_policy.teacher_mix=1", r"\[0, 1\)"),
                       ("on_policy.estimator=sampled", r"on_policy\.estimator=full"),
                       ("on_policy.engine=vllm", r"on_policy\.engine=hf")):  # fmt: skip
        with pytest.raises(RecipeError, match=match):
            recipe(tmp_path, "on_policy.teacher_mix=0.5", bad)


def test_own_reverse_kl_is_monitored_for_any_objective(tmp_path, setup):
    tok, teacher, examples = setup
    r = recipe(tmp_path, "loss.kind=jsd", "loss.kd_temperature=2.0")
    method = build_method(r, vocab_size=len(tok))
    student = prune_layers(teacher, [0, 3]).requires_grad_(True)
    batch = method.sequences(
        collate(examples[:2], pad_token_id=tok.pad_token_id),
        student=student, teacher=teacher, tokenizer=tok, step=0, index=0,
    )  # fmt: skip
    sums = method.loss(student, teacher, batch)
    assert set(sums.terms) == {"soft"}  # the monitor goes to the stats, not the loss terms
    with torch.no_grad():
        out_s, out_t = student(**batch_inputs(batch)), teacher(**batch_inputs(batch))
    mask = batch["labels"] != -100
    expected = divergence(out_s.logits[mask], out_t.logits[mask], "reverse_kl").mean()
    # A KL this small is a difference of log-probabilities of order 10: fp32 rounding of those
    # leaves ~1e-7 absolute, whichever kernels (AVX2, AVX-512) summed them.
    assert method.pop_stats()["own_reverse_kl"] == pytest.approx(
        float(expected), rel=1e-4, abs=1e-6
    )


def batch_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_forward_only_fused_sums_match_the_reference_without_gradient_work():
    """The own-sample monitor is a fused pass under no_grad: its value is the reference's sum,
    and it leaves nothing to backpropagate."""
    torch.manual_seed(0)
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    th, tw = torch.randn(9, 6), torch.randn(40, 6)
    labels = torch.randint(0, 40, (9,))
    labels[2] = -100
    with torch.no_grad():
        sums = fused_distill_sums(
            h, w, labels, teacher_hidden=th, teacher_weight=tw, kind="reverse_kl"
        )
    keep = labels != -100
    ref = divergence(h[keep] @ w.T, th[keep] @ tw.T, "reverse_kl").sum()
    torch.testing.assert_close(sums.terms["soft"], ref.detach())
    assert not sums.loss.requires_grad


# --- verify: the student's samples gated by the task's verifier ----------------------------------

ANSWERED = [{**rec, "answer": str(a + b)} for rec, (a, b) in zip(RECORDS, [(1, 2), (3, 4), (10, 7), (8, 8), (12, 30), (5, 9), (21, 21), (6, 1)], strict=True)]  # fmt: skip


def verifying(tmp_path, setup, records=ANSWERED, *overrides):
    """An on_policy method with verify=number, its examples read through its own hook."""
    tok, _, _ = setup
    r = recipe(tmp_path, "on_policy.verify=number", *overrides)
    method = build_method(r, vocab_size=len(tok))
    method.bind(tok, tok)
    examples, _ = tokenize_records(records, tok, max_length=64, encode=method.example)
    return r, method, examples


def test_uncollate_gives_back_the_examples_a_batch_was_collated_from(setup):
    from potstill.data import uncollate

    tok, _, examples = setup
    batch = collate(examples[:4], pad_token_id=tok.pad_token_id)  # rows of different lengths
    back = collate(uncollate(batch), pad_token_id=tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(back[key], batch[key]), key


def test_verify_keeps_right_samples_and_puts_the_data_in_place_of_wrong_ones(tmp_path, setup):
    tok, teacher, _ = setup
    records = [*ANSWERED[:2], RECORDS[2]]  # the third record has no answer to check against
    _, method, examples = verifying(tmp_path, setup, records)
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    texts = ["1 + 2 = 3", "3 + 4 = 8", "no answer here"]  # right, wrong, unchecked
    written = [[*tok.encode(t, add_special_tokens=False), tok.eos_token_id] for t in texts]
    fake = types.SimpleNamespace(sample=lambda prompts, params: written)
    method.sampler = lambda *a, **k: fake
    out = method.sequences(
        batch, student=teacher, teacher=teacher, tokenizer=tok, step=0, index=0
    )  # fmt: skip
    assert out["sampled_by_student"].tolist() == [True, False, True]
    prompts = batch_prompts(batch)
    for row in (0, 2):  # the student's samples, scored
        n = len(prompts[row]) + len(written[row])
        assert out["input_ids"][row, :n].tolist() == prompts[row] + written[row]
        assert out["labels"][row][out["labels"][row] != -100].tolist() == written[row]
    n = int(batch["attention_mask"][1].sum())  # the rejected one: the data's row, unchanged
    assert out["input_ids"][1, :n].tolist() == batch["input_ids"][1, :n].tolist()
    assert out["labels"][1, :n].tolist() == batch["labels"][1, :n].tolist()
    assert (out["labels"][1, n:] == -100).all()
    assert method.pop_stats()["student_correct_share"] == 0.5  # of the two it could check


def test_own_reverse_kl_is_watched_on_the_students_rows_only(tmp_path, setup):
    tok, teacher, examples = setup
    r = recipe(tmp_path, "loss.kind=forward_kl")
    method = build_method(r, vocab_size=len(tok))
    student = prune_layers(teacher, [0, 3])
    batch = collate(examples[:3], pad_token_id=tok.pad_token_id)
    batch["sampled_by_student"] = torch.tensor([False, True, False])
    method.loss(student, teacher, batch)
    with torch.no_grad():
        out_s, out_t = student(**batch_inputs(batch)), teacher(**batch_inputs(batch))
    mask = batch["labels"] != -100
    mask[[0, 2]] = False
    expected = divergence(out_s.logits[mask], out_t.logits[mask], "reverse_kl").mean()
    assert method.pop_stats()["own_reverse_kl"] == pytest.approx(
        float(expected), rel=1e-4, abs=1e-6
    )


def test_a_run_whose_every_sample_is_rejected_trains_as_token_level_on_the_data(tmp_path, setup):
    """A random tiny student never writes the right sum: each of its samples gives way to the
    data's row, so the run is token-level KD on the data, weight for weight."""
    tok, teacher, _ = setup
    steps = ["train.max_steps=3", "loss.kind=reverse_kl"]
    r, method, examples = verifying(tmp_path / "on", setup, ANSWERED, *steps)
    on = prune_layers(teacher, [0, 3]).requires_grad_(True)
    result = train(r, method, student=on, tokenizer=tok, train_examples=examples,
                   teacher=teacher, vocab_size=len(tok))  # fmt: skip
    assert [row["student_correct_share"] for row in result.history if "loss" in row] == [0.0] * 3
    plain, _ = tokenize_records(ANSWERED, tok, max_length=64)
    assert_trains_as_token_level(tmp_path / "tl", setup, on, plain, steps)


def test_verify_reads_each_records_reference_as_potstill_generate_does(tmp_path, setup):
    from potstill.generate import load_prompts

    data = tmp_path / "answered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ANSWERED[:3]))
    _, method, _ = verifying(tmp_path, setup, ANSWERED[:3])
    items = load_prompts(str(data))
    assert method.references == [
        {k: getattr(item, k) for k in ("answer", "task", "question", "metadata")} for item in items
    ]
    assert method.references[2]["question"] == "What is 10 plus 7?"  # the prompt's user turn


def test_verify_needs_records_with_an_answer(tmp_path, setup):
    from potstill.errors import DataError

    _, teacher, _ = setup
    _, method, _ = verifying(tmp_path, setup, RECORDS[:2])
    with pytest.raises(DataError, match=r"no record has one.*on_policy\.verify=none"):
        method.attach(teacher, teacher)  # before the first step
    verifying(tmp_path, setup, [ANSWERED[0], RECORDS[1]])[1].attach(teacher, teacher)  # one will do


# --- recipe -----------------------------------------------------------------------------------


def test_recipe_defaults_and_errors(tmp_path):
    assert recipe(tmp_path).loss.kind == "reverse_kl"  # GKD / MiniLLM default
    assert recipe(tmp_path, "method=token_level").loss.kind == "forward_kl"
    assert recipe(tmp_path, "loss.kind=jsd").loss.kind == "jsd"
    with pytest.raises(RecipeError, match="lmbda"):
        recipe(tmp_path, "on_policy.lmbda=1.5")
    with pytest.raises(RecipeError, match="packing"):
        recipe(tmp_path, "data.packing=true")
    with pytest.raises(RecipeError, match="sampling_temperature"):
        recipe(tmp_path, "on_policy.sampling_temperature=0")
    with pytest.raises(RecipeError, match=r"did you mean `loss\.kd_temperature`"):
        recipe(tmp_path, "loss.temperature=2")
    with pytest.raises(RecipeError, match=r"on_policy\.compile=false or on_policy\.engine=hf"):
        recipe(tmp_path, "on_policy.compile=true", "on_policy.engine=vllm")
    with pytest.raises(RecipeError, match=r"on_policy\.verify` must be one of"):
        recipe(tmp_path, "on_policy.verify=exact")
    with pytest.raises(RecipeError, match=r"set on_policy\.estimator=full.*on_policy\.verify=none"):
        recipe(tmp_path, "on_policy.verify=auto", "on_policy.estimator=sampled")


# --- vLLM sampler, against a stand-in -----------------------------------------------------------


def test_vllm_sampler_pushes_weights_and_seeds_each_prompt(monkeypatch, tiny_chat_lm):
    from potstill.generation.vllm_engine import VLLMSampler

    model, tok = tiny_chat_lm
    calls = {"loaded": 0}

    class LLM:
        def __init__(self, model, **kw):
            calls["engine"] = kw

        def apply_model(self, fn):
            class Engine:
                def load_weights(self, weights):
                    calls["loaded"] += 1
                    calls["names"] = [n for n, _ in weights]

            fn(Engine())

        def generate(self, requests, sampling_params, use_tqdm):
            calls["sampling"] = sampling_params
            out = [5, 6, tok.eos_token_id, 7]  # an engine may write past the stop: it is cut
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=out)])] * len(
                requests
            )

    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    sampler = VLLMSampler(model, tok, stop_token_ids=[9])
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)
    out = sampler.sample([[1, 2], [1, 3]], params)
    assert out == [[5, 6, tok.eos_token_id]] * 2
    assert calls["loaded"] == 1 and "model.embed_tokens.weight" in calls["names"]
    seeds = [p["seed"] for p in calls["sampling"]]
    assert seeds[0] != seeds[1]  # per prompt, as the hf sampler seeds
    assert 9 in calls["sampling"][0]["stop_token_ids"]


# --- the real bundled pair --------------------------------------------------------------------


def test_a_few_on_policy_steps_on_the_bundled_pair(tmp_path, smollm2_dir):
    from potstill.prepare import load_data, load_models

    r = load_recipe(
        "recipes/on_policy_gkd.yaml",
        [f"teacher.model={smollm2_dir}", "train.max_steps=2", f"train.output_dir={tmp_path}",
         "student.model=null", "student.init=prune", "student.keep_layers=[0, 6, 12, 18, 24, 29]",
         "on_policy.lmbda=1", "on_policy.compile=false",
         "on_policy.max_new_tokens=8", "data.max_train_records=8", "data.max_eval_records=2",
         "train.eval_every=0", "train.save_model=false", "train.batch_size=2"],
    )  # fmt: skip
    models = load_models(r)
    data = load_data(r, models.tokenizer)
    method = build_method(r, vocab_size=models.vocab_size)
    result = train(
        r, method, student=models.student, tokenizer=models.tokenizer, train_examples=data.train,
        eval_examples=data.eval, teacher=models.teacher, vocab_size=models.vocab_size,
    )  # fmt: skip
    first = result.history[0]
    assert first["on_policy_fraction"] == 1.0 and first["student_sample_len_max"] <= 8
    assert result.eval["own_reverse_kl"] > 0
    # the recipe compiles the student's decode step (switched off here: compiling takes ~30 s on
    # 2 cores; compiled decoding against the dynamic path: tests/test_generation_hf.py)
    assert load_recipe("recipes/on_policy_gkd.yaml").on_policy.compile
