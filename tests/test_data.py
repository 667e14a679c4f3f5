"""The data layer: loading, validation, loss masks, shifted labels, packing, bundled sources."""

import json

import pytest
import torch

from potstill.data import (
    DataError,
    Example,
    collate,
    final_answer,
    load_records,
    model_inputs,
    record_format,
    tokenize_record,
    tokenize_records,
)

# ---------------------------------------------------------------------------------------------
# helpers and a tiny character-level tokenizer (BOS added, its own chat template)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye now"},
    {"role": "assistant", "content": "Ciao, friend."},
]


def target_spans(example: Example, tokenizer) -> list[str]:
    """Decoded runs of consecutive target tokens (index 0 is never a prediction target)."""
    spans, run = [], []
    for i, (tok, is_target) in enumerate(zip(example.input_ids, example.target_mask, strict=True)):
        if is_target and i > 0:
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def non_target_text(example: Example, tokenizer) -> str:
    return tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.target_mask, strict=True) if not m]
    )


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per character, adds BOS itself; template writes {{ bos_token }} as well."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|start|>", "<|end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|start|>", "<|end|>"],
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start|>{{ m.role }}\n{{ m.content }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
    )
    return tok


def questions(records: list[dict]) -> set[str]:
    return {r["messages"][0]["content"] for r in records}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# loss masks per record shape (real SmolLM2 tokenizer, ChatML)


def test_text_record_is_all_targets_and_ends_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex, truncated = tokenize_record({"text": "To be, or not to be"}, tok, max_length=64)
    assert not truncated
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids) == "To be, or not to be<|im_end|>"
    assert all(ex.target_mask)


def test_prompt_completion_targets_only_completion_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rec = {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4, of course."}
    ex, _ = tokenize_record(rec, tok, max_length=64)
    assert target_spans(ex, tok) == [" 4, of course.<|im_end|>"]
    assert non_target_text(ex, tok) == rec["prompt"]


def test_messages_target_each_assistant_turn_with_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex, _ = tokenize_record({"messages": CHAT}, tok, max_length=512)
    assert target_spans(ex, tok) == ["Hello!<|im_end|>\n", "Ciao, friend.<|im_end|>\n"]
    hidden = non_target_text(ex, tok)
    for text in ("Be brief.", "Hi there", "Bye now", "<|im_start|>assistant\n"):
        assert text in hidden
    assert hidden.count("<|im_start|>assistant\n") == 2  # headers are context, not targets


def test_message_list_prompt_completion_learns_only_the_completion(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rec = {"prompt": CHAT[:4], "completion": [{"role": "assistant", "content": "Later!"}]}
    assert record_format(rec) == "prompt_completion"
    ex, _ = tokenize_record(rec, tok, max_length=512)
    assert target_spans(ex, tok) == ["Later!<|im_end|>\n"]  # not the earlier "Hello!"


def test_char_tokenizer_bos_is_added_once_and_never_a_target(char_tokenizer):
    tok = char_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    text, _ = tokenize_record({"text": "abc"}, tok, max_length=16)
    assert text.input_ids == [bos, *tok("abc", add_special_tokens=False)["input_ids"], eos]
    pc, _ = tokenize_record({"prompt": "Q?", "completion": "A."}, tok, max_length=16)
    assert pc.input_ids[0] == bos and pc.input_ids.count(bos) == 1
    assert pc.target_mask == [False, False, False, True, True, True]  # <s> Q ? | A . </s>
    chat, _ = tokenize_record({"messages": CHAT[1:3]}, tok, max_length=128)
    assert chat.input_ids.count(bos) == 1  # the template's {{ bos_token }}, not a second one
    assert target_spans(chat, tok) == ["Hello!<|end|>"]


def test_chat_template_that_is_not_prefix_stable_is_an_error(char_tokenizer):
    import copy

    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = tok.chat_template.replace(
        "<|start|>assistant\n{% endif", "<|start|>bot{% endif"
    )
    with pytest.raises(DataError, match="prefix-stable at message 1"):
        tokenize_record({"messages": CHAT[1:3]}, tok, max_length=128)


def test_messages_without_chat_template_is_an_error(char_tokenizer):
    import copy

    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"no chat template.*text or prompt/completion"):
        tokenize_record({"messages": CHAT[1:3]}, tok, max_length=128)


# ---------------------------------------------------------------------------------------------
# collate: shifted labels


@pytest.mark.parametrize("ignore_index", [-100, 42])
def test_collate_shifts_labels_onto_the_next_target_token(smollm2_tokenizer, ignore_index):
    tok = smollm2_tokenizer
    records = [{"messages": CHAT}, {"prompt": "Say hi:", "completion": " hi"}, {"text": "abc"}]
    examples, stats = tokenize_records(records, tok, max_length=512)
    batch = collate(examples, pad_token_id=tok.pad_token_id, ignore_index=ignore_index)
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["attention_mask"][b].sum() == n
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        labels = batch["labels"][b].tolist()
        for t in range(T):
            supervised = t + 1 < n and e.target_mask[t + 1]
            assert labels[t] == (e.input_ids[t + 1] if supervised else ignore_index)
    assert (batch["labels"] != ignore_index).sum() == stats.target_tokens


# ---------------------------------------------------------------------------------------------
# truncation and dropping


def test_truncation_is_counted_and_untrainable_records_dropped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    long_prompt = "word " * 40
    records = [
        {"text": "one two three four five six seven eight nine ten eleven twelve"},  # cut
        {"prompt": long_prompt, "completion": " done"},  # completion cut away -> dropped
        {"text": "short"},  # kept whole
    ]
    examples, stats = tokenize_records(records, tok, max_length=8)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert all(len(e.input_ids) <= 8 for e in examples)
    assert len(examples[0].input_ids) == 8
    summary = stats.summary()
    assert "3 records → 2 examples" in summary
    assert "2 truncated to max_length=8" in summary and "1 dropped" in summary


# ---------------------------------------------------------------------------------------------
# packing


def test_packing_blocks_positions_and_targets(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [
        {"messages": CHAT},
        {"prompt": "Translate 'chat':", "completion": " cat"},
        {"text": "Now is the winter of our discontent made glorious summer"},
        {"messages": CHAT[1:3]},
    ]
    plain, plain_stats = tokenize_records(records, tok, max_length=4096)
    blocks, stats = tokenize_records(records, tok, max_length=16, packing=True, progress=True)
    lengths = [len(b.input_ids) for b in blocks]
    assert all(n == 16 for n in lengths[:-1]) and 0 < lengths[-1] <= 16
    assert sum(lengths) == stats.tokens == plain_stats.tokens
    assert [t for b in blocks for t in b.input_ids] == [t for e in plain for t in e.input_ids]

    # position_ids restart at 0 at every document start and at every block start, else +1
    doc_starts, at = set(), 0
    for e in plain:
        doc_starts.add(at)
        at += len(e.input_ids)
    at = 0
    for b in blocks:
        for i, p in enumerate(b.position_ids):
            assert p == (0 if i == 0 or at + i in doc_starts else b.position_ids[i - 1] + 1)
        at += len(b.input_ids)

    # every supervised label is a target of the same document; only block cuts lose targets
    flat_mask = [m for e in plain for m in e.target_mask]
    batch = collate(blocks, pad_token_id=tok.pad_token_id)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    for b, block in enumerate(blocks):
        for t in range(len(block.input_ids) - 1):
            if batch["labels"][b, t] != -100:
                assert batch["position_ids"][b, t + 1] == batch["position_ids"][b, t] + 1
                assert flat_mask[16 * b + t + 1]
    lost = plain_stats.target_tokens - stats.target_tokens
    assert 0 <= lost <= len(blocks) - 1
    assert "packed" in stats.summary()


def test_packed_batch_keeps_documents_apart_in_a_transformers_model():
    """model_inputs() gives the only call that isolates packed documents (see tokenize.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    doc_a, doc_b = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]
    blocks = [Example(doc_a + doc_b, [True] * 12, list(range(5)) + list(range(7)))]
    batch = collate(blocks, pad_token_id=0)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([doc_b])).logits[0]  # (7, V)
        packed = model(**model_inputs(batch)).logits[0, 5:]  # (7, V)
        leaky = model(**{**model_inputs(batch), "attention_mask": batch["attention_mask"]})
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky.logits[0, 5:], alone, atol=1e-3)  # the trap is real


# ---------------------------------------------------------------------------------------------
# loading and validation errors


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:4: invalid JSON .*fix or delete"):
        load_records(str(path))


def test_blank_lines_skipped_and_limit(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('\n{"text": "a", "answer": 1}\n\n{"text": "b"}\n{"text": "c"}\n')
    assert load_records(str(path)) == [{"text": "a", "answer": 1}, {"text": "b"}, {"text": "c"}]
    assert load_records(str(path), limit=2) == [{"text": "a", "answer": 1}, {"text": "b"}]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl .*has no records"):
        load_records(str(empty))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_records("data/nope/train.csv")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"question": "q", "answer": "a"},
            r"data\.jsonl:2: .*none of .*keys found: \['answer', 'question'\]",
        ),
        ({"prompt": "p"}, r"data\.jsonl:2: .*not both"),
        ({"text": "t", "messages": []}, r"data\.jsonl:2: .*mixes shapes"),
        ({"text": 3}, r"data\.jsonl:2: 'text' must be a string"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}, "both be strings"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"data\.jsonl:2: .*no assistant"),
        ({"messages": [{"role": "user"}]}, r"needs a string 'content'"),
    ],
)
def test_bad_records_name_the_line_and_keys(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, bad])
    with pytest.raises(DataError, match=message):
        load_records(str(path))


def test_record_format():
    assert record_format({"text": "x", "metadata": {"a": 1}}) == "text"
    assert record_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert record_format({"messages": CHAT}) == "messages"


def test_unreachable_hub_id_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="neither a local path nor a reachable Hub dataset"):
        load_records("some-org/some-dataset")


# ---------------------------------------------------------------------------------------------
# file formats


ROWS = [
    {"prompt": "2+2=", "completion": "4", "answer": "4"},
    {"prompt": "3+3=", "completion": "6", "answer": "6"},
]
CHAT_ROWS = [{"messages": CHAT, "answer": "x"}, {"messages": CHAT[1:3], "answer": "y"}]


def test_csv_and_parquet_round_trip(tmp_path):
    import pandas as pd

    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    assert load_records(str(tmp_path / "d.csv")) == ROWS
    pd.DataFrame(CHAT_ROWS).to_parquet(tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet")) == CHAT_ROWS


def test_json_list_and_folder_of_split_files(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=2))
    assert load_records(str(tmp_path / "list.json")) == ROWS
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "validation.jsonl", ROWS[:1])
    assert load_records(str(folder)) == ROWS
    assert load_records(str(folder), split="eval") == ROWS[:1]  # eval served by validation
    with pytest.raises(DataError, match="none for split 'extra'"):
        load_records(str(folder), split="extra")


def test_save_to_disk_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_records(str(tmp_path / "one")) == CHAT_ROWS
    both = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1])
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict"), split="test") == ROWS[:1]
    assert load_records(str(tmp_path / "dict"), split="eval") == ROWS[:1]
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\] but not 'other'"):
        load_records(str(tmp_path / "dict"), split="other")


# ---------------------------------------------------------------------------------------------
# bundled sources


def test_bundled_shakespeare_splits_hold_out_whole_plays():
    train = load_records("bundled:shakespeare")
    held_out = load_records("bundled:shakespeare", split="eval")
    assert len(train) > 1000 and len(held_out) > 50
    assert not {r["play"] for r in train} & {r["play"] for r in held_out}
    assert not {r["text"] for r in train} & {r["text"] for r in held_out}
    assert all(record_format(r) == "text" and 0 < len(r["text"]) <= 1500 for r in train)
    assert not any(mark in r["text"] for r in train for mark in ("**", "#", "\\["))
    assert load_records("bundled:shakespeare?chunk_chars=500", limit=3)[0]["text"].count("\n") > 2
    assert load_records("bundled:shakespeare", limit=5) == train[:5]  # deterministic


def test_bundled_gsm_symbolic_has_worked_solutions_and_disjoint_splits():
    train = load_records("bundled:rg/gsm_symbolic?size=60")
    held_out = load_records("bundled:rg/gsm_symbolic?size=40", split="eval")
    assert (len(train), len(held_out)) == (60, 40)
    for r in train:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"], r["task"]) == ("user", "assistant", "gsm_symbolic")
        reply = assistant["content"]
        assert reply.endswith(f"Answer: {r['answer']}") and final_answer(reply) == r["answer"]
        assert "####" not in reply
        assert len(reply.splitlines()) >= 3  # steps, not just the number
    assert not questions(train) & questions(held_out)
    assert load_records("bundled:rg/gsm_symbolic?size=5&seed=1") != train[:5]


def test_bundled_small_arithmetic_splits_never_share_a_question():
    # one-digit sums repeat often, so only the question-hash split keeps train and eval apart
    source = "bundled:rg/basic_arithmetic?size=150&min_terms=2&max_terms=2&max_digits=1"
    train, held_out = load_records(source), load_records(source, split="test")
    first = train[0]["messages"][1]["content"]
    assert " = " in first and first.endswith(f"Answer: {train[0]['answer']}")
    assert not questions(train) & questions(held_out)


def test_bundled_errors():
    with pytest.raises(DataError, match=r"unknown bundled source 'poetry'.*bundled:shakespeare"):
        load_records("bundled:poetry")
    with pytest.raises(DataError, match=r"unknown reasoning-gym task 'nope'.*gsm_symbolic"):
        load_records("bundled:rg/nope")
    with pytest.raises(DataError, match="not 'dev2'"):
        load_records("bundled:shakespeare", split="dev2")
    with pytest.raises(DataError, match="does not take options"):
        load_records("bundled:shakespeare?size=3")
    with pytest.raises(DataError, match="bad options"):
        load_records("bundled:rg/gsm_symbolic?colour=blue")


@pytest.mark.parametrize("held_out", ["separate", "sampled"])
def test_measuring_reads_the_same_held_out_set_without_tokenizing_the_training_set(
    held_out, tmp_path, smollm2_tokenizer, monkeypatch, capsys
):
    from potstill import prepare
    from potstill.recipe import load_recipe

    rows = [{"prompt": f"{a} plus 2 is", "completion": f" {a + 2}"} for a in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    data = ["method=sft", "student.model=x", f"data.train={tmp_path / 'train.jsonl'}"]
    data.append("data.max_eval_records=5")
    if held_out == "separate":
        data.append(f"data.eval={tmp_path / 'eval.jsonl'}")
    r = load_recipe(None, data)
    full = prepare.load_data(r, smollm2_tokenizer)
    assert "train data" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(
        prepare, "tokenize_records", lambda records, *a, **k: seen.append(len(records)) or
        tokenize_records(records, *a, **k),
    )  # fmt: skip
    measured = prepare.load_data(r, smollm2_tokenizer, held_out_only=True)
    assert seen == [5] and measured.train == [] and "train data" not in capsys.readouterr().out
    assert measured.eval == full.eval and measured.eval_records == full.eval_records
    assert len(full.train) == (40 if held_out == "separate" else 35)
