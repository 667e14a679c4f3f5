"""The student transform seam: every method's student goes through it.

``prepare`` (after the student is initialised, before the optimizer sees it) → the loop trains →
``plain_state_dict`` converts the trained student back to a plain Hugging Face model's weights →
``save`` writes it. Two transforms exist:

* **LoRA** (``student.lora.r > 0``, PEFT): the listed linear layers get low-rank adapters; only
  the adapters train. Saved merged (a plain model, ``W + (α/r)·BA``) or adapter-only (a PEFT
  adapter folder over the pretrained student it came from).
* **QAT** (``student.qat.format: q8_0 | q4_0``): each quantized weight is replaced, in every
  forward, by its GGUF block-format rounding (``potstill.quant``), with straight-through
  gradients to the full-precision master weight. Which tensors take which format is
  :func:`tensor_format`, the one rule the exporter (``potstill.export``) also follows. The saved
  model holds the rounded values themselves, so whatever loads it (``potstill evaluate``,
  transformers, the GGUF writer) sees exactly the weights that ship.

Both are plain attribute rewrites of the model: LoRA replaces ``nn.Linear`` modules (PEFT's
``LoraLayer``), QAT registers a ``torch.nn.utils.parametrize`` parametrization on ``weight``, so
any code that reads ``module.weight`` — the fused loss reading the LM head included — reads the
fake-quantized value. A LoRA-wrapped LM head is read through :func:`effective_head_weight`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from potstill.errors import RecipeError
from potstill.quant import BLOCK, FORMATS, fake_quantize

# The token embedding and the output head stay at Q8_0 in a Q4_0 student: the vocabulary-sized
# matrices are the most sensitive to 4-bit rounding (llama.cpp's own Q4_0 preset keeps the output
# above 4 bits too, at Q6_K; Q8_0 is the nearest block format this grid offers).
EMBEDDING_FORMAT = "q8_0"
ROLES = ("embedding", "output", "linear", "other")


def tensor_format(role: str, shape: tuple[int, ...], scheme: str) -> str | None:
    """The GGUF block format a weight takes in ``scheme`` (q8_0 | q4_0), or None (kept in float:
    1-D tensors such as norms and biases, and rows whose length is not a multiple of 32).

    ``role``: embedding (the token embedding), output (the LM head), linear (a projection
    inside the decoder), other (anything else: kept in float)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if len(shape) != 2 or shape[-1] % BLOCK or role == "other":
        return None
    if role in ("embedding", "output"):
        return EMBEDDING_FORMAT if scheme == "q4_0" else scheme
    return scheme


def weight_roles(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{module name: (module, role)}`` for every module whose ``weight`` a QAT student
    quantizes: the token embedding, the LM head, and each ``nn.Linear`` in between."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    roles = {}
    for name, module in model.named_modules():
        if module is embedding:
            roles[name] = (module, "embedding")
        elif module is output:
            roles[name] = (module, "output")
        elif isinstance(module, nn.Linear):
            roles[name] = (module, "linear")
    return roles


class _Grid(nn.Module):
    """A ``weight`` parametrization: the weight on a GGUF block grid, straight-through."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quantize(weight, self.fmt)

    def extra_repr(self) -> str:
        return self.fmt


# ----------------------------------------------------------------------------- prepare


def prepare(model: nn.Module, spec: Any, seed: int = 0) -> nn.Module:
    """Apply the recipe's ``student.lora`` / ``student.qat`` to ``model`` in place; returns it.
    New adapters are drawn from ``seed`` (train.seed), whatever the global RNG holds."""
    lora, qat = spec.lora, spec.qat  # (validated together by recipe.validate)
    if qat.format:
        add_qat(model, qat.format)
    if lora.r:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_lora(model, lora)
    return model


def add_qat(model: nn.Module, scheme: str) -> dict[str, str]:
    """Register the fake-quantization parametrizations; ``{module name: format}``."""
    if scheme not in FORMATS:
        raise RecipeError(f"student.qat.format must be one of {FORMATS}, got {scheme!r}")
    chosen = {}
    for name, (module, role) in weight_roles(model).items():
        fmt = tensor_format(role, tuple(module.weight.shape), scheme)
        if fmt is not None and not parametrize.is_parametrized(module, "weight"):
            # (a tied head and embedding share one Parameter: both modules get the same grid)
            parametrize.register_parametrization(module, "weight", _Grid(fmt))
            chosen[name] = fmt
    if not chosen:
        raise RecipeError(f"student.qat found no weight to quantize in {type(model).__name__}")
    model.config.potstill_qat = scheme
    return chosen


def add_lora(model: nn.Module, spec: Any) -> nn.Module:
    """Inject PEFT LoRA adapters into ``model`` in place; everything else is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec.target_modules
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets if targets != ["all-linear"] else "all-linear",
        bias="none",
    )
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise RecipeError(f"student.lora.target_modules: {err}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    model._potstill_lora = config
    return model


# ----------------------------------------------------------------------------- the LM head


def effective_head_weight(head: nn.Module) -> Tensor:
    """The weight the LM head multiplies by, ``(V, H)``: its own for a plain (or fake-quantized)
    head; base + (α/r)·BA for a PEFT LoRA head, differentiable in the adapters. A LoRA head whose
    dropout is active is refused: dropout on the hidden states has no single weight."""
    if not _is_lora(head):
        return head.weight
    weight = head.get_base_layer().weight
    if head.disable_adapters or head.merged:
        return weight
    if head.training and any(
        not isinstance(head.lora_dropout[name], nn.Identity) for name in head.active_adapters
    ):
        raise RecipeError(
            "the LM head has a LoRA adapter with dropout, which the fused loss (it reads the "
            "head as one weight matrix) cannot apply: set student.lora.dropout=0, or drop "
            "lm_head from student.lora.target_modules"
        )
    return merged_weight(head)


def _is_lora(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (told without importing PEFT)."""
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _has_qat(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def merged_weight(layer: nn.Module) -> Tensor:
    """A LoRA layer's weight with its active adapters merged in: W + Σ (α/r)·BA."""
    weight = layer.get_base_layer().weight
    for name in layer.active_adapters:
        weight = weight + layer.get_delta_weight(name)
    return weight


# ----------------------------------------------------------------------------- convert and save


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained student's weights under a plain model's names: QAT weights rounded to their
    grid (what ships), LoRA adapters merged into their base weights; nothing is modified."""
    replaced = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _is_lora(module):
            replaced[f"{prefix}weight"] = merged_weight(module)
        elif parametrize.is_parametrized(module, "weight"):
            replaced[f"{prefix}weight"] = module.weight
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or (".parametrizations." in key and not key.endswith(".original")):
            continue
        key = key.replace(".base_layer.", ".").replace(
            ".parametrizations.weight.original", ".weight"
        )
        out[key] = replaced.get(key, value).detach()
    return out


def describe(model: nn.Module) -> str:
    """A short note of the transforms applied, for the run's first lines ('' when none)."""
    notes = []
    if hasattr(model, "_potstill_lora"):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        notes.append(f"LoRA r={model._potstill_lora.r}: {trainable / 1e6:.2f}M trainable")
    if _has_qat(model):
        notes.append(f"QAT on the GGUF {model.config.potstill_qat} grid")
    return "".join(f"; {n}" for n in notes)


def is_transformed(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters or QAT parametrizations."""
    return hasattr(model, "_potstill_lora") or _has_qat(model)


def save(
    model: nn.Module,
    path: str,
    *,
    lora_save: str = "merged",
    base: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the student to ``path`` (an existing, empty directory): a plain Hugging Face model,
    or with ``lora_save='adapter'`` a PEFT adapter folder over ``base``. ``state_dict``: the
    weights of a plain student whose own are sharded (gathered by the engine)."""
    if state_dict is not None and is_transformed(model):
        raise ValueError("a gathered state dict is saved for plain students only")
    if lora_save == "adapter" and hasattr(model, "_potstill_lora"):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        config = model._potstill_lora
        config.base_model_name_or_path = base
        config.task_type = "CAUSAL_LM"
        config.save_pretrained(path)
        weights = {  # named as a PeftModel over the base names them
            f"base_model.model.{k}": v.detach().contiguous()
            for k, v in get_peft_model_state_dict(model).items()
        }
        save_file(weights, f"{path}/adapter_model.safetensors", metadata={"format": "pt"})
        return
    with torch.no_grad():
        state = state_dict
        if state is None and is_transformed(model):
            state = plain_state_dict(model)
    roles = {role: f"{name}.weight" for name, (_, role) in weight_roles(model).items()}
    head, embedding = ((state or {}).get(roles.get(r)) for r in ("output", "embedding"))
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        model.config.tie_word_embeddings = False  # a LoRA head merged apart from the embedding
    elif head is not None and model.config.tie_word_embeddings:
        # a gathered or rounded state dict holds a tied head as a copy of its own: the embedding
        # is enough (written twice, the file would grow by a vocabulary × hidden matrix)
        state = {k: v for k, v in state.items() if k != roles["output"]}
    model.save_pretrained(path, safe_serialization=True, state_dict=state)
