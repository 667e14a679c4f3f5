"""GGUF's Q8_0 and Q4_0 block formats as fake quantization: what a weight becomes when it is
written to a GGUF file and read back by llama.cpp, computed in torch so a student can train on
that grid (quantization-aware training) with straight-through gradients.

Both formats cut a row into blocks of 32 weights with one float16 scale d per block:

* Q8_0: d = max|x| / 127, q = round(x / d) (half away from zero), q ∈ [−127, 127].
* Q4_0: d = m / −8 where m is the block's weight of largest magnitude (with its sign),
  q = clamp(trunc(x / d + 8.5), 0, 15) − 8, q ∈ [−8, 7].

The weight read back is float16(d) · q, while q itself is computed with the float32 d — the order
ggml's reference quantizers (and the ``gguf`` package's numpy ones) use; the functions here match
``gguf.quants.dequantize(gguf.quants.quantize(x, T), T)`` bit for bit (tested). Pure functions of
tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # weights per block in both formats
FORMATS = ("q8_0", "q4_0")


def _blocks(x: Tensor) -> Tensor:
    """(..., K) with K a multiple of 32 -> (n_blocks, 32) fp32."""
    if x.shape[-1] % BLOCK:
        raise ValueError(
            f"GGUF block formats quantize rows in blocks of {BLOCK}; a last dimension of "
            f"{x.shape[-1]} does not divide (keep such tensors in float16 or float32)"
        )
    return x.float().reshape(-1, BLOCK)


def _round_half_away(x: Tensor) -> Tensor:
    """ggml's roundf: halves go away from zero (torch.round goes to even)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def q8_0(x: Tensor) -> Tensor:
    """``x`` on the Q8_0 grid, same shape, fp32. (..., K) -> (..., K)"""
    blocks = _blocks(x)  # (n, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # (n, 1)
    q = _round_half_away(blocks * _inverse(d))
    return (d.half().float() * q).reshape(x.shape)


def q4_0(x: Tensor) -> Tensor:
    """``x`` on the Q4_0 grid, same shape, fp32. (..., K) -> (..., K)"""
    blocks = _blocks(x)  # (n, 32)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # (n, 1), signed
    d = largest / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15) - 8
    return (d.half().float() * q).reshape(x.shape)


def fake_quantize(x: Tensor, fmt: str) -> Tensor:
    """``x`` rounded to GGUF format ``fmt`` in the forward pass, unchanged in the backward pass
    (the straight-through estimator): the gradient reaches the full-precision weight as if the
    rounding were the identity. Returns ``x``'s dtype."""
    grid = {"q8_0": q8_0, "q4_0": q4_0}
    if fmt not in grid:
        raise ValueError(f"GGUF block format must be one of {FORMATS}, got {fmt!r}")
    return _StraightThrough.apply(x, grid[fmt](x.detach()).to(x.dtype))


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded tensor exactly (``x + (r − x)`` would round again); backward: the
    upstream gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, rounded: Tensor) -> Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None
