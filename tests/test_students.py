"""The student seam: QAT parametrizations on the GGUF grid, LoRA adapters, the LM head reader
and the fused loss under both, saving (merged, adapter-only, on the grid), recipe checks."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from potstill import quant, students
from potstill.errors import RecipeError
from potstill.lm import head_logits, lm_head
from potstill.losses import distillation_sums, fused_distill_sums
from potstill.models import load_model
from potstill.recipe import LoraSpec, QatSpec, StudentSpec, load_recipe


def tiny(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def lora(model, *targets, dropout=0.0):
    spec = StudentSpec(lora=LoraSpec(r=4, target_modules=list(targets), dropout=dropout))
    students.prepare(model, spec, seed=0)
    with torch.no_grad():  # B starts at zero; give the adapters a visible update
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_tensor_format_follows_the_stated_rules():
    f = students.tensor_format
    assert f("linear", (64, 32), "q4_0") == "q4_0" and f("linear", (64, 32), "q8_0") == "q8_0"
    assert f("embedding", (96, 32), "q4_0") == "q8_0" and f("output", (96, 32), "q4_0") == "q8_0"
    assert f("linear", (32,), "q4_0") is None  # norms, biases
    assert f("linear", (64, 48), "q4_0") is None  # rows not a multiple of 32 stay float
    assert f("other", (64, 32), "q4_0") is None
    with pytest.raises(ValueError, match="role"):
        f("conv", (64, 32), "q4_0")


def test_qat_reads_every_weight_on_its_grid_with_straight_through_gradients():
    model = tiny()
    plain = tiny()  # the same weights, set to their grid values by hand
    students.add_qat(model, "q4_0")
    roles = students.weight_roles(model)
    with torch.no_grad():
        for name, (module, role) in roles.items():
            master = module.parametrizations.weight.original
            grid = quant.q8_0(master) if role in ("embedding", "output") else quant.q4_0(master)
            assert torch.equal(module.weight, grid), name
            plain.get_submodule(name).weight.copy_(grid)
    # a tied head and embedding keep one master weight
    assert model.lm_head.parametrizations.weight.original is (
        model.model.embed_tokens.parametrizations.weight.original
    )
    ids = torch.randint(0, 96, (2, 9))
    model(ids, labels=ids).loss.backward()
    plain(ids, labels=ids).loss.backward()
    for name, (module, _) in roles.items():  # the grid's gradient reaches the master unchanged
        if name == "lm_head":
            continue  # tied: its gradient is summed into the embedding's
        torch.testing.assert_close(
            module.parametrizations.weight.original.grad, plain.get_submodule(name).weight.grad
        )
    torch.testing.assert_close(
        model.model.embed_tokens.parametrizations.weight.original.grad,
        plain.model.embed_tokens.weight.grad,
    )


def _losses(model, hidden, teacher, labels, path):
    """(loss, grad of hidden, grads of trainable parameters) on the fused or naive path."""
    model.zero_grad()
    hidden = hidden.clone().requires_grad_(True)
    teacher_h = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    if path == "fused":
        weight, _ = lm_head(model)
        t_weight, _ = lm_head(teacher)
        sums = fused_distill_sums(
            hidden, weight, labels, teacher_hidden=teacher_h, teacher_weight=t_weight,
            hard_weight=0.3, kind="jsd",
        )  # fmt: skip
    else:
        with torch.no_grad():
            t_logits = head_logits(teacher, teacher_h)
        sums = distillation_sums(
            head_logits(model, hidden), t_logits, labels, hard_weight=0.3, kind="jsd"
        )
    sums.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.loss.detach(), hidden.grad, grads


@pytest.mark.parametrize(
    "transform",
    ["lora_head", "lora_body", "qat"],
)
def test_transformed_heads_give_the_fused_loss_the_naive_loss_and_gradients(transform):
    model, teacher = tiny(), tiny(seed=1).requires_grad_(False)
    if transform == "qat":
        students.add_qat(model, "q4_0")
    else:
        lora(model, "q_proj", *(["lm_head"] if transform == "lora_head" else []))
    hidden = torch.randn(12, 32)
    labels = torch.randint(0, 96, (12,))
    labels[3] = -100
    fused = _losses(model, hidden, teacher, labels, "fused")
    naive = _losses(model, hidden, teacher, labels, "naive")
    torch.testing.assert_close(fused[0], naive[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], naive[1], rtol=1e-4, atol=1e-6)
    assert fused[2].keys() == naive[2].keys()
    assert bool(fused[2]) is (transform != "lora_body")  # hidden states in: only the head's
    for name, grad in naive[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6)
    if transform == "lora_head":
        assert "lm_head.lora_B.default.weight" in fused[2]
    if transform == "lora_body":  # a frozen head: the fused loss computes no weight gradient
        assert lm_head(model)[0].requires_grad is False


def test_a_lora_head_with_dropout_is_refused_while_training():
    model = lora(tiny(), "q_proj", "lm_head", dropout=0.1).train()
    with pytest.raises(RecipeError, match=r"dropout=0"):
        lm_head(model)
    lm_head(model.eval())  # evaluation applies no dropout: the merged weight is exact


def test_only_adapters_train():
    model = lora(tiny(), "q_proj", "v_proj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert "LoRA r=4" in students.describe(model)


def test_saved_students_are_what_trained(tmp_path):
    ids = torch.randint(0, 96, (1, 11))
    # QAT: a plain model whose weights lie on the grid and carry the format in the config
    model = tiny()
    students.add_qat(model, "q4_0")
    students.save(model, str(tmp_path / "qat"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    assert loaded.config.potstill_qat == "q4_0"
    with safe_open(tmp_path / "qat" / "model.safetensors", "pt") as f:  # a tied head once
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    up = loaded.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up, quant.q4_0(up)) and not torch.equal(
        up, tiny().model.layers[0].mlp.up_proj.weight
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # LoRA merged, the head's adapter included: the tie is dropped since head ≠ embedding
    model = lora(tiny(), "q_proj", "lm_head").eval()
    students.save(model, str(tmp_path / "merged"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # LoRA adapter-only over a saved base: load_model merges it back
    tiny().save_pretrained(tmp_path / "base")
    model = lora(tiny(), "q_proj", "down_proj").eval()
    students.save(
        model, str(tmp_path / "adapter"), lora_save="adapter", base=str(tmp_path / "base")
    )
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    loaded = load_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["student.lora.r=8", "student.qat.format=q4_0"], "together"),
        (["student.lora.r=8", "student.lora.save=adapter"], "save: merged"),
        (["student.qat.format=q5_0"], "q8_0"),
        (["student.lora.r=-1"], "r >= 0"),
        (["student.lora.save=both"], "merged or adapter"),
    ],
)
def test_recipe_refuses_student_transforms_that_cannot_work(overrides, match):
    base = ["teacher.model=t", "student.init=prune", "student.keep_layers=[0]"]
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, [*base, *overrides])


def test_unknown_lora_targets_name_the_key():
    with pytest.raises(RecipeError, match="target_modules"):
        students.prepare(tiny(), StudentSpec(lora=LoraSpec(r=2, target_modules=["nope"])))


def test_qat_spec_default_is_off():
    assert QatSpec().format is None and LoraSpec().r == 0
