"""Padding-free forward passes (lm.final_hidden): the same hidden states and gradients as the
padded pass, for right-padded rows, packed blocks and sliding-window layers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from potstill import lm
from potstill.data import Example, collate, pack
from potstill.lm import final_hidden, padding_free

LENGTHS = [9, 3, 14, 1]


def ragged_batch(vocab: int, lengths=LENGTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    examples = [
        Example(torch.randint(2, vocab, (n,), generator=g).tolist(), [True] * n) for n in lengths
    ]
    return collate(examples, pad_token_id=0)


def both_passes(model, batch):
    """(padding-free, padded) hidden states; asserts which attention ran."""
    calls = lm._varlen_attention.calls
    free = final_hidden(model, batch)
    assert lm._varlen_attention.calls > calls  # the padding-free path really ran
    with padding_free(False):
        padded = final_hidden(model, batch)
    return free, padded


def test_right_padded_rows_match_the_padded_pass(tiny_llama):
    model = tiny_llama(64).eval()
    batch = ragged_batch(64)
    with torch.no_grad():
        free, padded = both_passes(model, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(free[keep], padded[keep], rtol=1e-5, atol=1e-5)
    assert free[~keep].abs().max() == 0  # pads are zeros, never garbage


def test_gradients_match_the_padded_pass(tiny_llama):
    batch = ragged_batch(64, seed=1)
    keep = batch["attention_mask"].bool()
    grads = []
    for enabled in (True, False):
        model = tiny_llama(64).train()  # same seed: same weights; no dropout in Llama by default
        with padding_free(enabled):
            h = final_hidden(model, batch)[keep]  # (S, H)
        (h.square().sum() + h[:, 0].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_blocks_keep_documents_apart(tiny_llama):
    """A packed block (position_ids restarting at 0) against transformers' own block-diagonal
    mask, and against each document run alone."""
    model = tiny_llama(64).eval()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (5, 7, 4, 9, 6)]
    blocks = pack([Example(d, [True] * len(d)) for d in docs], block_size=16)
    batch = collate(blocks, pad_token_id=0)  # 31 tokens: blocks of 16 and 15 (one pad)
    assert "position_ids" in batch and not batch["attention_mask"].bool().all()
    with torch.no_grad():
        free, padded = both_passes(model, batch)
        alone = final_hidden(model, {"input_ids": torch.tensor([docs[0]]),
                                     "attention_mask": torch.ones(1, 5, dtype=torch.long)})  # fmt: skip
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(free[keep], padded[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(free[0, :5], alone[0], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_match_the_padded_pass():
    """Gemma 3: sliding-window layers (window 4) on documents longer than the window."""
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
    batch = ragged_batch(64, lengths=[11, 3, 7])
    with torch.no_grad():
        free, padded = both_passes(model, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(free[keep], padded[keep], rtol=1e-5, atol=1e-5)


def test_full_rows_and_eager_models_run_padded(tiny_llama):
    model = tiny_llama(64).eval()
    calls = lm._varlen_attention.calls
    full = ragged_batch(64, lengths=[6, 6])  # no padding: nothing to drop
    with torch.no_grad():
        final_hidden(model, full)
        model.config._attn_implementation = "eager"  # chosen for what SDPA lacks: respected
        final_hidden(model, ragged_batch(64))
    assert lm._varlen_attention.calls == calls


def test_a_model_that_ignores_the_attention_switch_is_refused():
    class OwnAttention(nn.Module):  # computes attention its own way, whatever the config says
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(_attn_implementation="sdpa")
            self.embed = nn.Embedding(16, 4)

        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(hidden_states=[self.embed(input_ids)])

    with pytest.raises(RuntimeError, match=r"train\.padding_free=false"):
        final_hidden(OwnAttention(), ragged_batch(16))


def test_bundled_smollm2_matches_the_padded_pass(smollm2_dir):
    from potstill.models import load_model

    model = load_model(str(smollm2_dir)).eval()
    batch = ragged_batch(49152, lengths=[40, 17, 33], seed=3)
    with torch.no_grad():
        free, padded = both_passes(model, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(free[keep], padded[keep], rtol=1e-4, atol=1e-4)


def test_a_sharded_head_is_refused_with_the_launch_that_works(tiny_llama, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from potstill.errors import RecipeError

    model = tiny_llama(64)
    weight, bias = lm.lm_head(model)  # whole: (V, H)
    assert weight.shape == (64, model.config.hidden_size) and bias is None
    head = model.get_output_embeddings()
    # What ZeRO-3 (and FSDP1 with use_orig_params) leave between forwards: an empty placeholder.
    head.weight = nn.Parameter(torch.empty(0))
    with pytest.raises(
        RecipeError, match=r"sharded.*ZeRO-3: a persistent parameter.*configs/accelerate/"
    ):
        lm.lm_head(model)
    # FSDP2: a DTensor (one process here, so the shard holds every row; still refused).
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        head.weight = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(RecipeError, match="DTensor"):
            lm.lm_head(model)
    finally:
        torch.distributed.destroy_process_group()
