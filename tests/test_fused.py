"""The fused chunked loss against the naive reference from #2: loss and gradients w.r.t. hidden
states, weight and bias, over odd shapes, every kind, temperatures, β/α, dtypes, ignore_index."""

from __future__ import annotations

import pytest
import torch

from potstill.losses import DIVERGENCES, distillation_loss
from potstill.losses.fused import (
    DEFAULT_CHUNK_BUDGET_BYTES,
    MIN_CHUNK_ROWS,
    auto_chunk_size,
    fused_distill_loss,
)

KINDS = sorted(DIVERGENCES)


def make(n, h_s, h_t, v, *, seed=0, dtype=torch.float32, bias=False, ignore=-100, masked_every=4):
    g = torch.Generator().manual_seed(seed)
    t = {
        "hs": torch.randn(n, h_s, generator=g),
        "ws": torch.randn(v, h_s, generator=g) / h_s**0.5 * 3,
        "ht": torch.randn(n, h_t, generator=g),
        "wt": torch.randn(v, h_t, generator=g) / h_t**0.5 * 3,
        "bs": torch.randn(v, generator=g) if bias else None,
        "bt": torch.randn(v, generator=g) if bias else None,
    }
    t = {k: (x.to(dtype) if x is not None else None) for k, x in t.items()}
    labels = torch.randint(0, v, (n,), generator=g)
    labels[labels == ignore] = 0
    if masked_every:
        labels[::masked_every] = ignore
    return t, labels


def naive(t, labels, **kw):
    """#2's path: full logits, then the objective; grads by autograd."""
    hs, ws = t["hs"].clone().requires_grad_(), t["ws"].clone().requires_grad_()
    bs = t["bs"].clone().requires_grad_() if t["bs"] is not None else None
    s = hs.float() @ ws.float().T + (bs.float() if bs is not None else 0)
    te = t["ht"].float() @ t["wt"].float().T + (t["bt"].float() if t["bt"] is not None else 0)
    loss, _ = distillation_loss(s, te, labels, **kw)
    loss.backward()
    return loss, hs.grad, ws.grad, (bs.grad if bs is not None else None)


def fused(t, labels, **kw):
    hs, ws = t["hs"].clone().requires_grad_(), t["ws"].clone().requires_grad_()
    bs = t["bs"].clone().requires_grad_() if t["bs"] is not None else None
    loss = fused_distill_loss(
        hs,
        ws,
        labels,
        teacher_hidden=t["ht"],
        teacher_weight=t["wt"],
        student_bias=bs,
        teacher_bias=t["bt"],
        **kw,
    )
    loss.backward()
    return loss, hs.grad, ws.grad, (bs.grad if bs is not None else None)


def assert_parity(a, b, rtol, atol):
    for x, y in zip(a, b, strict=True):
        if x is None:
            assert y is None
            continue
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


SHAPES = [(1, 3, 3, 5), (37, 17, 9, 123), (64, 31, 48, 1000), (129, 8, 8, 257)]  # (N, H_s, H_t, V)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_parity_every_kind_and_shape(kind, shape):
    t, labels = make(*shape, seed=hash(kind) % 1000, bias=shape[0] % 2 == 1)
    kw = dict(kind=kind, temperature=1.0, beta=0.5, alpha=0.1, hard_weight=0.0)
    assert_parity(
        fused(t, labels, chunk_size=16, **kw), naive(t, labels, **kw), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "kind,temperature,beta,alpha,soft,hard",
    [
        ("jsd", 2.0, 0.1, 0.1, 1.0, 0.0),
        ("jsd", 0.7, 0.9, 0.1, 0.5, 0.5),
        ("jsd", 1.0, 0.0, 0.1, 1.0, 0.0),
        ("jsd", 1.0, 1.0, 0.1, 1.0, 0.2),
        ("skew_forward_kl", 3.0, 0.5, 0.3, 1.0, 0.1),
        ("skew_reverse_kl", 1.5, 0.5, 0.05, 0.9, 0.1),
        ("forward_kl", 4.0, 0.5, 0.1, 0.0, 1.0),
        ("tvd", 2.0, 0.5, 0.1, 1.0, 1.0),
    ],
)
def test_fp32_parity_hyperparameters_and_hard_term(kind, temperature, beta, alpha, soft, hard):
    t, labels = make(45, 20, 24, 311, seed=3, bias=True)
    kw = dict(
        kind=kind,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        soft_weight=soft,
        hard_weight=hard,
    )
    assert_parity(
        fused(t, labels, chunk_size=8, **kw), naive(t, labels, **kw), rtol=1e-4, atol=1e-6
    )


def test_nondefault_ignore_index_and_global_normalizer():
    t, labels = make(50, 16, 16, 97, seed=4, ignore=42, masked_every=3)
    kw = dict(kind="reverse_kl", hard_weight=0.3, ignore_index=42, normalizer=torch.tensor(123))
    out = fused(t, labels, chunk_size=7, **kw)
    assert_parity(out, naive(t, labels, **kw), rtol=1e-4, atol=1e-6)
    assert (out[1][::3] == 0).all()  # ignored rows get no gradient


def test_teacher_logits_path_matches_hidden_path():
    t, labels = make(40, 12, 20, 150, seed=5)
    teacher_logits = t["ht"] @ t["wt"].T
    hs = t["hs"].clone().requires_grad_()
    a = fused_distill_loss(
        hs, t["ws"], labels, teacher_logits=teacher_logits, kind="jsd", chunk_size=9
    )
    a.backward()
    ref = fused(t, labels, kind="jsd", chunk_size=9)
    torch.testing.assert_close(a, ref[0])
    torch.testing.assert_close(hs.grad, ref[1])


def test_all_masked_is_zero_with_finite_zero_grads():
    t, labels = make(10, 8, 8, 33, seed=6, masked_every=0)
    labels[:] = -100
    loss, gh, gw, _ = fused(t, labels, kind="jsd", hard_weight=0.5)
    assert loss.item() == 0.0
    assert torch.isfinite(gh).all() and (gh == 0).all() and (gw == 0).all()


def test_grad_output_scaling_and_teacher_gets_no_grad():
    t, labels = make(20, 8, 8, 40, seed=7)
    hs = t["hs"].clone().requires_grad_()
    wt = t["wt"].clone().requires_grad_()
    loss = fused_distill_loss(
        hs, t["ws"], labels, teacher_hidden=t["ht"], teacher_weight=wt, chunk_size=6
    )
    (3.0 * loss).backward()
    hs2 = t["hs"].clone().requires_grad_()
    fused_distill_loss(
        hs2, t["ws"], labels, teacher_hidden=t["ht"], teacher_weight=t["wt"]
    ).backward()
    torch.testing.assert_close(hs.grad, 3.0 * hs2.grad)
    assert wt.grad is None


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_bf16_inputs_parity(kind):
    t, labels = make(96, 64, 32, 509, seed=8, dtype=torch.bfloat16, bias=True)
    got = fused(t, labels, kind=kind, hard_weight=0.1, chunk_size=32)
    ref = naive(t, labels, kind=kind, hard_weight=0.1)  # fp32 maths on the same bf16 values
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-3)
    for x, y in zip(got[1:], ref[1:], strict=True):
        err = (x.float() - y.float()).norm() / y.float().norm()
        assert err < 3e-2, err


def test_autocast_runs_matmuls_in_bf16_and_matches():
    t, labels = make(64, 32, 32, 300, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(t, labels, kind="forward_kl", chunk_size=16)
    ref = naive(t, labels, kind="forward_kl")
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-3)
    assert got[1].dtype == torch.float32  # gradients come back in the inputs' dtype
    assert (got[1] - ref[1]).norm() / ref[1].norm() < 3e-2


def test_chunking_does_not_change_the_result():
    t, labels = make(77, 16, 16, 200, seed=10)
    results = [
        fused(t, labels, kind="jsd", hard_weight=0.2, chunk_size=c) for c in (1, 5, 64, 1000)
    ]
    for other in results[1:]:
        assert_parity(other, results[0], rtol=1e-5, atol=1e-7)


def test_auto_chunk_size_respects_budget_and_floor():
    for v in (5, 49152, 151936, 262144):
        for itemsize in (2, 4):
            n = auto_chunk_size(v, itemsize)
            assert n % 32 == 0 and MIN_CHUNK_ROWS <= n <= 4096
            if n > MIN_CHUNK_ROWS:  # above the minimum the budget holds
                assert n * v * itemsize * 2 <= DEFAULT_CHUNK_BUDGET_BYTES
    assert auto_chunk_size(49152) == 320  # fp32: 128 MiB / (49,152 x 4 B x 2 buffers)
    assert auto_chunk_size(49152, 2) == 672  # bf16: twice the rows, rounded down to 32
    assert auto_chunk_size(151936) == auto_chunk_size(262144) == MIN_CHUNK_ROWS


def test_bad_teacher_arguments():
    t, labels = make(4, 8, 8, 10)
    with pytest.raises(ValueError, match="exactly one of these forms"):
        fused_distill_loss(t["hs"], t["ws"], labels)
    with pytest.raises(ValueError, match="exactly one of these forms"):  # two teachers at once
        fused_distill_loss(
            t["hs"], t["ws"], labels, teacher_logits=torch.zeros(4, 10),
            teacher_ids=torch.zeros(4, 3, dtype=torch.long), teacher_logprobs=torch.zeros(4, 3),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"must both be \(N, k\)"):
        fused_distill_loss(
            t["hs"], t["ws"], labels, teacher_ids=torch.zeros(4, 3, dtype=torch.long),
            teacher_logprobs=torch.zeros(4, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="shared vocabulary"):
        fused_distill_loss(t["hs"], t["ws"], labels, teacher_logits=torch.zeros(4, 11))


@pytest.mark.slow
def test_compiled_matches_eager():
    t, labels = make(70, 16, 16, 130, seed=11)
    kw = dict(kind="jsd", beta=0.3, hard_weight=0.1, chunk_size=32)
    assert_parity(
        fused(t, labels, compile=True, **kw), fused(t, labels, **kw), rtol=1e-4, atol=1e-6
    )
