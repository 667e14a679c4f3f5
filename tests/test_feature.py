"""Feature distillation: the layer map, MiniLM-v2 relations and TinyBERT attention KL against
naive references (loss and gradients, unequal widths and head counts), what one forward pass
captures (padded and padding-free alike), and the method end to end with projectors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _signals import loss_marker_prelude

from potstill.lm import forward_features, padding_free
from potstill.losses.feature import (
    attention_kl,
    hidden_distance,
    relation_kl,
    uniform_layer_map,
)


def test_the_uniform_layer_map_spreads_the_student_over_the_teacher():
    assert uniform_layer_map(6, 30) == [(0, 4), (1, 9), (2, 14), (3, 19), (4, 24), (5, 29)]
    assert uniform_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert uniform_layer_map(3, 2) == [(0, 0), (1, 0), (2, 1)]  # last meets last


def naive_relations(x: torch.Tensor, heads: int, causal: bool = True) -> torch.Tensor:
    """(n, H) -> (heads, n, n) relation probabilities, one entry at a time."""
    n, width = x.shape
    d = width // heads
    out = torch.zeros(heads, n, n)
    for a in range(heads):
        part = x[:, a * d : (a + 1) * d]
        for i in range(n):
            seen = i + 1 if causal else n
            scores = torch.stack([part[i] @ part[j] / math.sqrt(d) for j in range(seen)])
            out[a, i, :seen] = torch.softmax(scores, 0)
    return out


def naive_kl_rows(p: torch.Tensor, q: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """KL(p ‖ q) per row over the causal entries, averaged over the first dim. -> (n,)"""
    n = p.shape[-1]
    keep = torch.ones(n, n).tril().bool() if causal else torch.ones(n, n).bool()
    terms = torch.where(keep, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), 0.0)
    return terms.sum(-1).mean(0)


def test_minilm_relations_match_the_naive_reference_across_widths():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 12, generator=g, requires_grad=True)  # 3 relation heads of 4
    teacher = torch.randn(5, 18, generator=g)  # 3 relation heads of 6
    got = relation_kl(student, teacher, heads=3)
    ref = naive_kl_rows(naive_relations(teacher, 3), naive_relations(student, 3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert (got >= -1e-6).all()
    bidirectional = relation_kl(student, teacher, heads=3, causal=False)  # an encoder's
    ref = naive_kl_rows(
        naive_relations(teacher, 3, causal=False), naive_relations(student, 3, causal=False), False
    )
    torch.testing.assert_close(bidirectional, ref, rtol=1e-5, atol=1e-6)
    same = relation_kl(teacher, teacher, heads=3)
    assert same.abs().max() < 1e-5
    with pytest.raises(ValueError, match="relation heads"):
        relation_kl(student, teacher, heads=5)


def test_attention_kl_matches_the_naive_reference_with_grouped_keys():
    g = torch.Generator().manual_seed(1)
    s_q = torch.randn(4, 6, 8, generator=g, requires_grad=True)  # 4 heads, D = 8
    s_k = torch.randn(2, 6, 8, generator=g, requires_grad=True)  # 2 KV heads (GQA)
    t_q, t_k = torch.randn(4, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    got = attention_kl(s_q, s_k, t_q, t_k)

    def probs(q, k):
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        future = torch.ones(6, 6).triu(1).bool()
        return torch.softmax(scores.masked_fill(future, float("-inf")), -1)

    ref = naive_kl_rows(probs(t_q, t_k), probs(s_q, s_k))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got.sum(), (s_q, s_k))
    ref_grads = torch.autograd.grad(ref.sum(), (s_q, s_k))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head by head"):
        attention_kl(s_q, s_k, t_q[:2], t_k)


def test_hidden_distances():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    torch.testing.assert_close(
        hidden_distance(s, t, loss="mse", normalize=False), ((s - t) ** 2).mean(-1)
    )
    cos = hidden_distance(s, 3 * s, loss="cosine", normalize=False)
    assert cos.abs().max() < 1e-6  # direction only
    # layer-normalised, a scaled and shifted copy is the same state
    assert hidden_distance(s, 5 * s + 2, loss="mse", normalize=True).max() < 1e-4


def test_one_pass_captures_the_same_features_padded_and_padding_free(tiny_chat_lm):
    model, _ = tiny_chat_lm
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with torch.no_grad():
        with padding_free(True):
            free = forward_features(model, batch, attention_layers=[0, 1])
        with padding_free(False):
            padded = forward_features(model, batch, attention_layers=[0, 1])
    assert free.documents == padded.documents == ((0, 6), (6, 9))
    assert len(free.hidden) == 3 and free.hidden[0].shape == (9, 32)
    for a, b in zip(free.hidden, padded.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for layer in (0, 1):
        (*qkv_a, scale_a), (*qkv_b, scale_b) = free.attention[layer], padded.attention[layer]
        assert scale_a == scale_b == 8**-0.5
        assert [tuple(x.shape) for x in qkv_a] == [(4, 9, 8), (2, 9, 8), (2, 9, 8)]
        for a, b in zip(qkv_a, qkv_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


RECORDS = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(12) for b in (3, 7)]


@pytest.fixture(scope="module")
def narrow_pair(tmp_path_factory, tiny_chat_lm):
    """The tiny teacher (32 wide, 4 heads, 2 layers) and a narrower 3-layer student (24 wide, 3
    heads, 1 KV head): projectors and relations across widths and head counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("feature")
    model, tokenizer = tiny_chat_lm
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
                      max_position_embeddings=512)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:20]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[20:]))
    (root / "r.yaml").write_text(
        f"method: feature\nteacher: {{model: {root / 'teacher'}}}\n"
        f"student: {{model: {root / 'student'}, init: pretrained}}\n"
        f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_length: 32}}\n"
        "feature: {hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0}\n"
        "train: {max_steps: 4, batch_size: 4, precision: fp32, save_every: 2, log_every: 1, "
        "lr: 0.01}\n"
    )
    return root


def test_the_feature_method_trains_projectors_and_saves_them_apart(narrow_pair, capsys):
    from safetensors.torch import load_file

    from potstill.cli import main

    out = narrow_pair / "run"
    args = ["train", str(narrow_pair / "r.yaml"), f"train.output_dir={out}"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "feature: forward_kl" in said and "3 projectors" in said
    assert "hidden mse ×1.0 on layers 0→0, 1→0, 2→1 (layer-normalised)" in said
    assert "attention (Q/K/V relations, 8 heads) ×1.0 on layers 2→1" in said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "relation kl ×1.0 between documents" in said
    train_rows = [r for r in rows if "hidden" in r]
    assert len(train_rows) == 4 and all(r["attention"] > 0 for r in train_rows)
    assert all(r["relation"] > 0 for r in train_rows)
    assert train_rows[-1]["hidden"] < train_rows[0]["hidden"]  # the projectors learn
    saved = load_file(out / "projectors.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        f"{i}.weight": (32, 24) for i in range(3)
    }
    student = load_file(out / "model" / "model.safetensors")
    assert not any("projector" in k for k in student)  # never part of the model


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("feature.relation_heads=5", "must divide"),
        ("feature.layer_map=[[0, 7]]", "outside"),
        ("feature.attention=probabilities", "head by head"),
        ("teacher.source=cache", "cannot train from a teacher cache"),
    ],
)
def test_impossible_feature_settings_are_refused_naming_the_key(
    narrow_pair, tmp_path, override, message, capsys
):
    from potstill.cli import main

    extra = [f"teacher.cache={tmp_path}"] if "cache" in override else []
    args = [
        "train",
        str(narrow_pair / "r.yaml"),
        override,
        *extra,
        f"train.output_dir={tmp_path}/r",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


KILL_PRELUDE = loss_marker_prelude("potstill.methods.feature", "Feature")  # tests/_signals.py


def test_a_killed_feature_run_resumes_bit_exact_projectors_included(narrow_pair, tmp_path):
    """SIGKILL after the first checkpoint (step 2 of 4), run again: the student and the
    projectors equal an uninterrupted run's bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def start(out, pause_at=0):
        marker = tmp_path / f"{out.name}.calls"
        env = {**os.environ, "MARKER": str(marker), "PAUSE_AT": str(pause_at)}
        argv = ["train", str(narrow_pair / "r.yaml"), f"train.output_dir={out}"]
        proc = subprocess.Popen([sys.executable, "-c", KILL_PRELUDE, *argv], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        return proc, marker

    whole, _ = start(tmp_path / "whole")  # beside the killed run
    proc, marker = start(tmp_path / "killed", pause_at=3)  # inside step 3, after checkpoint 2
    deadline = time.monotonic() + 240
    while not (marker.is_file() and len(marker.read_text().split()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    said = whole.communicate(timeout=300)[0]  # read as it runs: a full pipe would stall it
    assert whole.returncode == 0, said[-2000:]
    assert (tmp_path / "killed" / "checkpoint").is_dir()
    proc, _ = start(tmp_path / "killed")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resuming from" in out, out[-2000:]
    for file in ("model/model.safetensors", "projectors.safetensors"):
        a, b = load_file(tmp_path / "whole" / file), load_file(tmp_path / "killed" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_batch_relations_compare_structure_not_coordinates():
    from potstill.losses.feature import rkd_angle, rkd_distance, similarity_kl, similarity_mse

    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    same_structure = 3.0 * teacher @ rotation  # rotated and scaled: the same relations
    other = torch.randn(6, 8, generator=g)  # another width
    for fn in (similarity_kl, similarity_mse, rkd_distance, rkd_angle):
        assert fn(same_structure, teacher).abs().max() < 1e-4, fn.__name__
        assert fn(other, teacher).shape == (6,) and fn(other, teacher).sum() > 1e-3, fn.__name__
    # similarity KL against a naive loop over examples
    s, t = (
        torch.nn.functional.normalize(other, dim=-1),
        torch.nn.functional.normalize(teacher, dim=-1),
    )
    ref = []
    for i in range(6):
        j = [k for k in range(6) if k != i]
        p = torch.softmax(t[i] @ t[j].T / 0.05, 0)
        q = torch.softmax(s[i] @ s[j].T / 0.05, 0)
        ref.append((p * (p.log() - q.log())).sum())
    torch.testing.assert_close(
        similarity_kl(other, teacher), torch.stack(ref), rtol=1e-4, atol=1e-5
    )


def test_every_term_is_the_same_padded_and_padding_free(narrow_pair):
    """The method's loss and each of its terms on a batch with padding, both ways."""
    from potstill.data import collate, tokenize_records
    from potstill.methods import build_method
    from potstill.prepare import load_models
    from potstill.recipe import load_recipe

    r = load_recipe(narrow_pair / "r.yaml", ["feature.attention=relations"])
    models = load_models(r)
    method = build_method(r, vocab_size=models.vocab_size)
    method.attach(models.student, models.teacher)
    mixed = [RECORDS[0], RECORDS[22], RECORDS[1], RECORDS[23]]  # "0+3=" beside "11+3="
    examples, _ = tokenize_records(mixed, models.tokenizer, max_length=32)
    batch = collate(examples, pad_token_id=models.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: real padding
    sums = {}
    for free in (True, False):
        with padding_free(free):
            sums[free] = method.loss(models.student, models.teacher, batch)
    assert set(sums[True].terms) == {"soft", "hidden", "attention", "relation"}
    for name in sums[True].terms:
        torch.testing.assert_close(
            sums[True].terms[name], sums[False].terms[name], rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(sums[True].loss, sums[False].loss, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["feature_hidden", "feature_attention"])
def test_a_few_steps_of_each_recipe_on_the_bundled_pair(recipe, tmp_path, smollm2_dir):
    from potstill.cli import main

    out = tmp_path / "run"
    args = [
        "train", f"recipes/{recipe}.yaml", "train.max_steps=2", "train.batch_size=2",
        "data.max_length=96", "data.max_train_records=8", "data.max_eval_records=4",
        "train.precision=fp32", "train.save_every=0", "train.log_every=1",
        f"train.output_dir={out}",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    term = "hidden" if recipe == "feature_hidden" else "attention"
    assert rows[0][term] > 0 and rows[0]["soft"] > 0
    assert math.isfinite(rows[-1]["eval/teacher_kl"])


def test_a_packed_row_gives_the_terms_of_its_documents_as_separate_rows(narrow_pair):
    """Two documents packed in one row (positions restarting at 0) against the same two as
    padded rows: every term — attention and relations only within a document — is the same."""
    from potstill.data import Example, collate
    from potstill.methods import build_method
    from potstill.prepare import load_models
    from potstill.recipe import load_recipe

    r = load_recipe(narrow_pair / "r.yaml")
    models = load_models(r)
    method = build_method(r, vocab_size=models.vocab_size)
    method.attach(models.student, models.teacher)
    a, b = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]
    rows = collate(
        [Example(a, [False, False, True, True, True, True, True]),
         Example(b, [False, True, True, True])],
        pad_token_id=0,
    )  # fmt: skip
    packed = collate(
        [Example(a + b, [False, False, True, True, True, True, True, False, True, True, True],
                 position_ids=[*range(len(a)), *range(len(b))])],
        pad_token_id=0,
    )  # fmt: skip
    sums = [method.loss(models.student, models.teacher, batch) for batch in (rows, packed)]
    assert set(sums[0].terms) == {"soft", "hidden", "attention", "relation"}
    for name in sums[0].terms:
        torch.testing.assert_close(sums[0].terms[name], sums[1].terms[name], rtol=1e-4, atol=1e-5)
