"""Loading teachers and students, depth pruning, and the token-level KD vocabulary preflight.

A model name is one of:
  * ``bundled:<name>``   a model shipped in a pip package, converted once to a safetensors cache
                         (see ``potstill.bundled_models``; works offline);
  * a local directory    a Hugging Face model folder (config.json + weights);
  * a local ``.gguf``    loaded and de-quantised by transformers;
  * anything else        a Hugging Face Hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from potstill.bundled_models import drop_gguf_quantizer, gguf_parsed_once, resolve_bundled_model
from potstill.errors import ModelLoadError, TokenizerMismatchError

if TYPE_CHECKING:  # the model classes import Accelerate: loaded where a model is built
    from transformers import PreTrainedModel

BUNDLED_PREFIX = "bundled:"
SUGGESTION = (
    "use a local model directory, a .gguf file, or `bundled:smollm2-135m-instruct` (works offline)"
)
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",  # whatever the checkpoint stores
}
# Config fields that hold one entry per decoder layer; pruning must keep them in step.
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
# Llama/Qwen/Gemma, GPT-2, others; BERT's encoder.layer
LAYER_CONTAINER_NAMES = ("layers", "h", "blocks", "block", "layer")


# ---------------------------------------------------------------------------------------------
# Names and loading


def _looks_like_local_path(name: str) -> bool:
    """A Hub id is `org/name` or `name`; anything path-shaped is meant to be on disk."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")  # a Windows drive, C:...
    )


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a model name to ``(path_or_hub_id, gguf_file)`` for ``from_pretrained``.

    ``gguf_file`` is the file name inside the returned folder when the name is a .gguf file,
    otherwise None.
    """
    if not name or not name.strip():
        raise ModelLoadError(f"empty model name: {SUGGESTION}")
    if name.startswith(BUNDLED_PREFIX):
        return str(resolve_bundled_model(name.removeprefix(BUNDLED_PREFIX))), None
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model path {name!r} is a file but not a .gguf file: pass the model's directory "
                "(with config.json and the weights) or a .gguf file"
            )
        return str(path.parent), path.name
    if _looks_like_local_path(name):
        raise ModelLoadError(f"no such model path {name!r}: {SUGGESTION}")
    return name, None  # a Hub id


def _load_error(kind: str, name: str, err: Exception) -> ModelLoadError:
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        return ModelLoadError(
            f"{name!r} has no config.json: not a Hugging Face model folder; point at a folder "
            "with config.json, the tokenizer and model.safetensors, a .gguf file or bundled:NAME"
        )
    if "trust_remote_code" in str(err):
        return ModelLoadError(
            f"{name!r} ships its own model code, which potstill does not run unless told to: "
            "read it, and if you trust it set teacher.trust_remote_code or "
            "student.trust_remote_code to true"
        )
    return ModelLoadError(f"could not load the {kind} of {name!r} ({err}); {SUGGESTION}")


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model name (see the module doc for the accepted names)."""
    path, gguf_file = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(
            path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:  # Hub/network/file errors are OSErrors
        raise _load_error("tokenizer", name, err) from err


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    encoder: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """A causal LM from a model name, on the CPU, in ``dtype`` (float32/bfloat16/float16/auto);
    with ``encoder``, the bare encoder (``AutoModel``: e.g. a BERT sentence encoder's body).

    Weights load from safetensors (or GGUF) only: a pickle checkpoint (``pytorch_model.bin``) can
    run code as it loads, so it is refused unless ``allow_pickle``."""
    from safetensors import SafetensorError

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path, gguf_file = resolve_model_path(name)
    if gguf_file is None and (Path(path) / "adapter_config.json").is_file():
        return _load_adapter(
            path, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
    if gguf_file is None and not allow_pickle:
        _refuse_pickle(path, name)
    safe = {} if gguf_file or allow_pickle else {"use_safetensors": True}
    try:
        from transformers import AutoModel, AutoModelForCausalLM  # here: it imports Accelerate

        # a GGUF's config and weights from one parse of its metadata
        with gguf_parsed_once() if gguf_file else contextlib.nullcontext():
            model = (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(
                path, gguf_file=gguf_file, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                **safe,
            )  # fmt: skip
    except ModelLoadError:
        raise
    except SafetensorError as err:  # e.g. a download cut short
        raise ModelLoadError(
            f"the weights of {name!r} are incomplete or corrupt ({err}); download or save the "
            "model again"
        ) from err
    except (OSError, ValueError) as err:
        raise _load_error("model", name, err) from err
    return drop_gguf_quantizer(model) if gguf_file else model


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(path: str, name: str) -> None:
    """A local folder whose only weights are pickles: refuse it, naming the way out."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{name!r} holds its weights only as a pickle ({', '.join(pickles[:3])}), which can "
            "run code when loaded: save it as safetensors (model.save_pretrained writes them), or "
            "set teacher.allow_pickle / student.allow_pickle to true if you trust the file"
        )


def _load_adapter(path: str, **kw: Any) -> PreTrainedModel:
    """A PEFT LoRA adapter folder (``student.lora.save: adapter``): its base model with the
    adapters merged in."""
    import json

    from peft import PeftModel

    base = json.loads((Path(path) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base:
        raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path")
    return PeftModel.from_pretrained(load_model(base, **kw), path).merge_and_unload()


# ---------------------------------------------------------------------------------------------
# Depth pruning (DistilBERT / Minitron style): keep a subset of the teacher's decoder layers


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers and the name of its ``nn.ModuleList``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for candidate in (decoder, model, getattr(model, "encoder", None)):
        for attr in LAYER_CONTAINER_NAMES:
            if isinstance(getattr(candidate, attr, None), nn.ModuleList):
                return candidate, attr
    raise ModelLoadError(
        f"cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList "
        f"named one of {LAYER_CONTAINER_NAMES} on model.get_decoder(); prune this model by hand"
    )


def validate_keep(keep: list[int], num_layers: int) -> list[int]:
    keep = list(keep)
    if not keep:
        raise ModelLoadError(f"keep is empty: name at least one of the {num_layers} layers to keep")
    for index in keep:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ModelLoadError(f"keep must hold layer indices (ints); got {index!r}")
        if not 0 <= index < num_layers:
            raise ModelLoadError(
                f"layer index {index} is out of range: the model has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )
    duplicates = sorted({i for i in keep if keep.count(i) > 1})
    if duplicates:
        raise ModelLoadError(f"layer index {duplicates[0]} appears more than once in keep={keep}")
    if keep != sorted(keep):
        raise ModelLoadError(f"keep must be sorted ascending (layers run in order); got {keep}")
    return keep


def _renumber_layer(layer: nn.Module, new_index: int) -> None:
    """Attention modules index the KV cache by ``layer_idx``; it must match the new position."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new_index


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: list[int]) -> Iterator[nn.Module]:
    """``model`` itself, running only the decoder layers ``keep`` (sorted ascending) inside the
    block: the layer list, the config's layer count and per-layer lists (``layer_types`` for
    sliding/full attention, ...) and each kept layer's ``layer_idx`` (the KV cache's index) are
    those of the pruned model; all are put back on leaving. No weights are copied."""
    holder, attr = decoder_layers(model)
    every = getattr(holder, attr)
    keep = validate_keep(keep, len(every))
    config = model.config.get_text_config()
    fields = ("num_hidden_layers", *PER_LAYER_CONFIG_LISTS)
    saved = {f: getattr(config, f) for f in fields if hasattr(config, f)}
    indices = [
        (module, module.layer_idx)
        for i in keep
        for module in every[i].modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    setattr(holder, attr, nn.ModuleList([every[i] for i in keep]))
    for new_index, layer in enumerate(getattr(holder, attr)):
        _renumber_layer(layer, new_index)
    for field in PER_LAYER_CONFIG_LISTS:
        values = saved.get(field)
        if isinstance(values, list | tuple) and len(values) == len(every):
            setattr(config, field, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    try:
        yield model
    finally:
        setattr(holder, attr, every)
        for field, value in saved.items():
            setattr(config, field, value)
        for module, index in indices:
            module.layer_idx = index


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new model (deep copy) that keeps only the decoder layers ``keep`` (sorted ascending).

    Embeddings, final norm and LM head are kept; the copy's config and layer indices are those
    :func:`only_layers` sets, and ``model`` is left as it was.
    """
    if getattr(model.config.get_text_config(), "is_heterogeneous", False):
        raise ModelLoadError(
            f"{type(model).__name__} has per-layer configs (per_layer_config); "
            "prune_layers does not support them"
        )
    with only_layers(model, keep):
        return copy.deepcopy(model)  # the layers set aside are not reachable: not copied


# ---------------------------------------------------------------------------------------------
# Students from a config


def load_config(name: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a model name, without loading weights."""
    path, gguf_file = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(
            path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise _load_error("config", name, err) from err


def _config_of(teacher_or_config: Any) -> PretrainedConfig:
    if isinstance(teacher_or_config, nn.Module):
        return copy.deepcopy(teacher_or_config.config)
    if isinstance(teacher_or_config, PretrainedConfig):
        return copy.deepcopy(teacher_or_config)
    if isinstance(teacher_or_config, str | os.PathLike):
        return load_config(str(teacher_or_config))
    raise TypeError(
        "student_from_config needs a model, a config, or a model name/path; "
        f"got {type(teacher_or_config).__name__}"
    )


def _student_config(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    """The teacher's config with ``overrides`` applied, rebuilt so derived fields follow."""
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise ModelLoadError(
            f"unknown config field {unknown[0]!r} for {type(config).__name__}; "
            "check the spelling against the teacher's config.json (e.g. num_hidden_layers, "
            "hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)"
        )
    values = config.to_dict()
    values.pop("quantization_config", None)
    # head_dim follows hidden_size / num_attention_heads unless it was set independently.
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    derived_head_dim = heads and hidden and values.get("head_dim") == hidden // heads
    values.update(overrides)
    if derived_head_dim and "head_dim" not in overrides:
        heads, hidden = values["num_attention_heads"], values["hidden_size"]
        if hidden % heads:
            raise ModelLoadError(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                "choose sizes that divide, or set head_dim explicitly"
            )
        values["head_dim"] = hidden // heads
    kv_heads = values.get("num_key_value_heads")
    if kv_heads and values.get("num_attention_heads", 0) % kv_heads:
        raise ModelLoadError(
            f"num_attention_heads {values['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {kv_heads}; choose a divisor"
        )
    # Per-layer lists of the wrong length are dropped so the config class rebuilds them from
    # its own pattern (e.g. Gemma 3's sliding_window_pattern).
    layers = values.get("num_hidden_layers")
    for field in PER_LAYER_CONFIG_LISTS:
        stale = isinstance(values.get(field), list) and len(values[field]) != layers
        if stale and field not in overrides:
            values[field] = None
    return type(config).from_dict(values)


def student_from_config(teacher_or_config: Any, overrides: dict[str, Any] | None = None):
    """A randomly initialised causal LM shaped like the teacher, with ``overrides`` applied.

    ``teacher_or_config`` is a model, a config, or a model name (bundled:, directory, .gguf,
    Hub id). Seed torch first for a reproducible init.
    """
    config = _student_config(_config_of(teacher_or_config), dict(overrides or {}))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters; tied embeddings are counted once."""
    # model.parameters() yields each Parameter object once, so tied weights appear once.
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Token-level KD preflight


def _vocab_differences(teacher: dict[str, int], student: dict[str, int], limit: int = 3):
    examples = []
    for token, index in sorted(teacher.items(), key=lambda item: item[1]):
        if student.get(token) != index:
            where = "missing" if token not in student else f"id {student[token]}"
            examples.append(f"{token!r} is id {index} in the teacher, {where} in the student")
    for token, index in sorted(student.items(), key=lambda item: item[1]):
        if token not in teacher:
            examples.append(f"{token!r} (id {index}) is only in the student")
    return examples[:limit]


def check_vocab_compatible(
    teacher_tokenizer,
    student_tokenizer,
    *,
    teacher_vocab_rows: int,
    student_vocab_rows: int,
    check_chat_template: bool = True,
) -> int:
    """Check that teacher and student logits index the same tokens; return V_shared.

    Embedding matrices may have padding rows beyond the tokenizer (e.g. 151,936 vs 152,064);
    the loss compares logits over ``[:V_shared]``, the real vocabulary ids.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        examples = "; ".join(_vocab_differences(teacher_vocab, student_vocab))
        raise TokenizerMismatchError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens; e.g. {examples}): token-level KD needs the same "
            "vocabulary; use `method: cross_tokenizer` (or sequence-level distillation, which "
            "works with any student vocabulary)"
        )
    shared = max(teacher_vocab.values()) + 1  # ids may have holes; logits are sliced by id
    for who, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows)):
        if rows < shared:
            raise TokenizerMismatchError(
                f"the {who} model has {rows} embedding rows but its tokenizer uses ids up to "
                f"{shared - 1}: the model and tokenizer do not belong together; load the "
                f"tokenizer that was saved with the {who}"
            )
    if check_chat_template and teacher_tokenizer.chat_template != student_tokenizer.chat_template:
        raise TokenizerMismatchError(
            "teacher and student chat templates differ: the student must use the teacher's chat "
            "template so prompts are formatted the same way (e.g. save a copy of the teacher "
            "tokenizer with the student), or pass check_chat_template=False"
        )
    return shared
