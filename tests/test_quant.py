"""GGUF block formats as fake quantization: bit-exact against the gguf package's quantizers (what
llama.cpp reads back), on the grid, and straight-through gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.quant import fake_quantize, q4_0, q8_0


def reference(x: torch.Tensor, fmt: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    kind = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[fmt]
    array = x.numpy().astype(np.float32)
    return torch.from_numpy(quants.dequantize(quants.quantize(array, kind), kind).copy())


def weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 96, generator=g) * torch.logspace(-4, 1, 24)[:, None]  # many scales
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = 0.5  # ties: x / d lands on halves
    w[2, 5] = -w[2, :32].abs().max() * 3  # a negative extreme (Q4_0 takes its sign)
    return w


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_grid_is_the_gguf_packages_bit_for_bit(fmt, seed):
    w = weights(seed)
    got = {"q8_0": q8_0, "q4_0": q4_0}[fmt](w)
    assert torch.equal(got, reference(w, fmt))


@pytest.mark.parametrize(("fmt", "levels"), [("q8_0", 255), ("q4_0", 16)])
def test_each_block_holds_at_most_its_formats_levels_and_rounding_is_idempotent(fmt, levels):
    w = weights(3)
    fq = {"q8_0": q8_0, "q4_0": q4_0}[fmt]
    once = fq(w)
    for block in once.reshape(-1, 32):
        assert block.unique().numel() <= levels
    assert torch.equal(fq(once), once)  # already on its grid: nothing moves
    assert (once - w).abs().max() <= w.abs().max() / (8 if fmt == "q4_0" else 127) + 1e-6


def test_gradients_pass_straight_through_and_bad_shapes_are_refused():
    w = weights(4).requires_grad_()
    out = fake_quantize(w, "q4_0")
    assert torch.equal(out.detach(), q4_0(w.detach()))
    (out * torch.arange(96.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(96.0).expand(24, 96))
    with pytest.raises(ValueError, match="blocks of 32"):
        q8_0(torch.zeros(3, 40))
    with pytest.raises(ValueError, match="q8_0"):
        fake_quantize(w, "q5_k")
