"""``potstill export``: a saved student as a GGUF file that llama.cpp runs.

Written with the ``gguf`` package: the architecture's metadata, the tokenizer (vocabulary, token
types, BPE merges, special ids) and the chat template go into the file, then every tensor under
its GGUF name. ``--type`` picks the weights' format:

* ``f16``: 2-D weights float16, norms float32.
* ``q8_0`` / ``q4_0``: the GGUF block formats, per tensor as :func:`potstill.students.tensor_format`
  says (decoder projections in the format, the token embedding / LM head Q8_0, norms float32) —
  the same rule a QAT student (``student.qat``) trained under. A QAT student's saved weights lie on
  that grid already, and both block quantizers reproduce a grid point exactly, so the file holds
  exactly the values it trained with (tested).

Architectures: the Llama family (``llama``: SmolLM2, Llama 2/3) and Qwen2 (``qwen2``). Llama's
query and key rows are reordered for llama.cpp's interleaved rotary layout (Hugging Face
checkpoints rotate halves); a reordering of whole rows leaves every 32-weight block intact.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potstill.errors import ModelLoadError, RecipeError
from potstill.students import tensor_format, weight_roles
from potstill.utils import free_bytes, human_bytes, when_disk_fills

TYPES = ("f16", "q8_0", "q4_0")
# model_type -> (GGUF architecture name, whether query/key rows need llama.cpp's rotary order)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
# The Hugging Face pre-tokenizers llama.cpp has a named equivalent of, by their tokenizer.json
# description; llama.cpp splits text before BPE by that name's regex.
_PRE_TOKENIZERS = {
    '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}': "gpt-2",
}


@dataclass
class Exported:
    path: Path
    type: str
    architecture: str
    tensor_types: dict[str, str]  # GGUF tensor name -> type name (F32, F16, Q8_0, Q4_0)
    bytes: int


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a query/key projection's rows from rotate-halves (Hugging Face) to interleaved
    pairs (llama.cpp's Llama): within each head, rows (i, i + d/2) become rows (2i, 2i + 1).
    (out, in) -> (out, in)."""
    out = weight.shape[0]
    half = out // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer(tokenizer: Any, model_type: str) -> str:
    described = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    key = json.dumps(described, separators=(",", ":"))
    if key in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[key]
    if model_type == "qwen2":
        return "qwen2"
    warnings.warn(
        f"llama.cpp has no named pre-tokenizer known to match this tokenizer's ({key[:120]}); "
        "the file says 'default', so llama.cpp may split raw text differently from the Hugging "
        "Face tokenizer (token ids given directly are unaffected)",
        stacklevel=3,
    )
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_rows: int, model_type: str) -> None:
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError("the GGUF exporter reads a fast (tokenizer.json) tokenizer")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] != "BPE":
        raise ModelLoadError(
            f"the GGUF exporter writes byte-level BPE tokenizers (gpt2 style); this one is "
            f"{model['type']}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [gguf.TokenType.UNUSED] * vocab_rows
    for token, index in tokenizer.get_vocab().items():
        if index >= vocab_rows:
            raise ModelLoadError(
                f"token {token!r} has id {index}, past the model's {vocab_rows} rows"
            )
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None:
            add(index)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_architecture(writer: Any, config: Any, name: str, ftype: Any) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelLoadError(
            f"the GGUF exporter writes unscaled rotary embeddings; this model's rope_type is "
            f"{rope['rope_type']!r}"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model_dir: str | Path, out: str | Path, type: str | None = None) -> Exported:
    """Write the model in ``model_dir`` (a Hugging Face folder, e.g. a run's ``model/``) to the
    GGUF file ``out``. ``type`` defaults to the grid a QAT student trained on, else f16."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model folder: {err}") from None
    if config.model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"the GGUF exporter knows the architectures {sorted(ARCHITECTURES)}, not "
            f"{config.model_type!r} ({model_dir}); llama.cpp's convert_hf_to_gguf.py covers more"
        )
    trained = getattr(config, "potstill_qat", None)
    type = type or trained or "f16"
    if type not in TYPES:
        raise RecipeError(f"--type must be one of {TYPES}, got {type!r}")
    if trained and type != trained:
        warnings.warn(
            f"{model_dir} was trained on the {trained} grid; exporting {type} rounds it "
            "differently from what it trained with",
            stacklevel=2,
        )
    arch, rotary_order = ARCHITECTURES[config.model_type]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    roles = {f"{name}.weight": role for name, (_, role) in weight_roles(model).items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    ftype = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[type]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            writer.close()
        tmp.unlink(missing_ok=True)

    def says() -> str:
        return (
            f"the disk of {out.parent} ran out while writing {out.name} "
            f"({human_bytes(free_bytes(out.parent))} free now, the partial file removed); free "
            "space, or write it to another disk (--gguf), or a smaller type (--type q8_0 / q4_0)"
        )

    _add_architecture(writer, config, model_dir.resolve().name, ftype)
    _add_tokenizer(writer, tokenizer, config.vocab_size, config.model_type)
    kinds = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the token embedding as the output head when absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelLoadError(f"no GGUF name for tensor {key!r} of a {config.model_type} model")
        data = tensor.detach().float().numpy()
        if rotary_order and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
            data = _rotary_rows(data, heads)
        fmt = None if type == "f16" else tensor_format(roles.get(key, "other"), data.shape, type)
        if fmt is not None:
            qtype = gguf.GGMLQuantizationType[fmt.upper()]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data.astype(np.float16))
        kinds[name] = (fmt or ("f32" if data.ndim == 1 else "f16")).upper()
    with when_disk_fills(out.parent, cleanup, says):  # the tensors are written here, not before
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        tmp.replace(out)
    return Exported(out, type, arch, kinds, out.stat().st_size)


# ----------------------------------------------------------------------------- llama.cpp


def llamacpp_logprobs(path: str | Path, ids: list[int], n_threads: int | None = None) -> Any:
    """Per-position log-probabilities ``(len(ids), V)`` (numpy float32) of the GGUF file at
    ``path`` run in llama.cpp (the optional ``llama-cpp-python`` package) on the token ids
    ``ids``: row t is the distribution of token t + 1."""
    llama = load_llamacpp(path, n_ctx=max(len(ids), 16), n_threads=n_threads)
    llama.reset()
    llama.eval(ids)
    scores = np.asarray(llama.scores[: len(ids)], dtype=np.float64)  # (T, V) logits
    shifted = scores - scores.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(np.float32)


def load_llamacpp(path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` over the GGUF file, all logits kept; a clear error without the extra."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise ModelLoadError(
            "llama.cpp's Python binding is not installed: pip install 'potstill[llamacpp]' "
            "(builds llama.cpp, a few minutes; on a CPU where the native build misbehaves, "
            "CMAKE_ARGS=-DGGML_NATIVE=OFF)"
        ) from err
    return Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=n_threads, verbose=False
    )
