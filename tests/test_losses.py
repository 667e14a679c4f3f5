"""Divergences and the objective: parity with a naive float64 reference, and properties."""

from __future__ import annotations

import itertools

import pytest
import torch

from potstill.losses import DIVERGENCES, cross_entropy, distillation_loss, divergence

KINDS = sorted(DIVERGENCES)


# ---------------------------------------------------------------- naive reference (float64, probabilities)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def reference(student, teacher, kind, *, temperature=1.0, beta=0.5, alpha=0.1):
    """Textbook formulas on probabilities, in float64; deliberately not sharing code with potstill."""
    q = torch.softmax(student.double() / temperature, -1)
    p = torch.softmax(teacher.double() / temperature, -1)
    if kind == "forward_kl":
        value = _kl64(p, q)
    elif kind == "reverse_kl":
        value = _kl64(q, p)
    elif kind == "jsd":
        if beta == 0:
            value = _kl64(p, q)
        elif beta == 1:
            value = _kl64(q, p)
        else:
            m = (1 - beta) * q + beta * p
            value = beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    elif kind == "skew_forward_kl":
        value = _kl64(p, alpha * p + (1 - alpha) * q)
    elif kind == "skew_reverse_kl":
        value = _kl64(q, (1 - alpha) * p + alpha * q)
    elif kind == "tvd":
        value = 0.5 * (p - q).abs().sum(-1)
    else:
        raise AssertionError(kind)
    return value * temperature**2


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


SHAPES = [(1, 2), (7, 5), (3, 47, 31), (2, 5, 123), (64, 1000)]
HYPER = [
    dict(temperature=1.0, beta=0.5, alpha=0.1),
    dict(temperature=2.0, beta=0.1, alpha=0.3),
    dict(temperature=0.7, beta=0.9, alpha=0.0),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hyper", HYPER, ids=["T1", "T2", "T0.7"])
def test_divergence_matches_reference_loss_and_grad(kind, shape, hyper):
    s = _logits(*shape, seed=1).requires_grad_()
    t = _logits(*shape, seed=2)
    ours = divergence(s, t, kind, **hyper)
    assert ours.shape == shape[:-1] and ours.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    ref = reference(s64, t, kind, **hyper)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    w = torch.rand(
        shape[:-1], generator=torch.Generator().manual_seed(3)
    )  # arbitrary upstream grad
    (ours * w).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_are_computed_in_fp32(kind):
    s, t = _logits(9, 300, seed=4), _logits(9, 300, seed=5)
    ours = divergence(s.bfloat16(), t.bfloat16(), kind)
    assert ours.dtype == torch.float32
    ref = reference(s.bfloat16().float(), t.bfloat16().float(), kind)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-4)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = _logits(6, 50, seed=6), _logits(6, 50, seed=7)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), divergence(s, t, "forward_kl"))
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "reverse_kl"))
    # and the directions really are different on these inputs
    assert not torch.allclose(divergence(s, t, "forward_kl"), divergence(s, t, "reverse_kl"))


def test_forward_kl_is_teacher_against_student():
    # teacher certain of token 0, student spread: KL(p‖q) = -log q_0; KL(q‖p) is huge
    t = torch.tensor([[20.0, 0.0, 0.0]])
    s = torch.zeros(1, 3)
    torch.testing.assert_close(
        divergence(s, t, "forward_kl"),
        torch.tensor([torch.log(torch.tensor(3.0))]),
        atol=1e-5,
        rtol=0,
    )
    assert divergence(s, t, "reverse_kl").item() > 10


def test_jsd_half_is_symmetric_and_skew_zero_is_plain_kl():
    s, t = _logits(5, 40, seed=8), _logits(5, 40, seed=9)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.5), divergence(t, s, "jsd", beta=0.5))
    torch.testing.assert_close(
        divergence(s, t, "skew_forward_kl", alpha=0.0), divergence(s, t, "forward_kl")
    )
    torch.testing.assert_close(
        divergence(s, t, "skew_reverse_kl", alpha=0.0), divergence(s, t, "reverse_kl")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_inputs_and_nonnegative(kind):
    x = _logits(8, 77, seed=10)
    torch.testing.assert_close(divergence(x, x.clone(), kind), torch.zeros(8), atol=1e-6, rtol=0)
    y = _logits(8, 77, seed=11)
    assert (divergence(x, y, kind) >= -1e-6).all()


def test_temperature_scales_by_t_squared():
    s, t = _logits(4, 30, seed=12), _logits(4, 30, seed=13)
    soft = divergence(s / 2.0, t / 2.0, "forward_kl")  # T=1 on pre-softened logits
    torch.testing.assert_close(divergence(s, t, "forward_kl", temperature=2.0), 4.0 * soft)


def test_bad_arguments_name_the_problem():
    s = _logits(2, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(s, s, "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(s, s, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence(s, s, "forward_kl", temperature=0.0)
    with pytest.raises(ValueError, match="shared vocabulary"):
        divergence(s, _logits(2, 4), "forward_kl")


# ---------------------------------------------------------------- the objective: masking, mixing, normalising


def _naive_objective(s, t, labels, ignore_index, kind, soft_w, hard_w, T):
    keep = labels != ignore_index
    per = soft_w * reference(
        s[keep], t[keep], kind, temperature=T
    ) + hard_w * torch.nn.functional.cross_entropy(s[keep].double(), labels[keep], reduction="none")
    return per.sum() / max(int(keep.sum()), 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.9, 0.1)])
def test_objective_matches_naive_with_nondefault_ignore_index(kind, weights):
    n, v, ignore = 23, 61, 42
    s = _logits(n, v, seed=14).requires_grad_()
    t = _logits(n, v, seed=15)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(16))
    labels[labels == ignore] = 0
    labels[::3] = ignore
    loss, terms = distillation_loss(
        s,
        t,
        labels,
        kind=kind,
        soft_weight=weights[0],
        hard_weight=weights[1],
        temperature=1.5,
        ignore_index=ignore,
    )
    s64 = s.detach().double().requires_grad_()
    ref = _naive_objective(s64, t, labels, ignore, kind, weights[0], weights[1], 1.5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)
    assert (s.grad[::3] == 0).all()  # ignored positions receive no gradient
    assert set(terms) == {k for k, w in zip(("soft", "hard"), weights, strict=True) if w}


def test_all_masked_batch_is_zero_with_finite_zero_grads():
    s = _logits(5, 11, seed=17).requires_grad_()
    t = _logits(5, 11, seed=18)
    labels = torch.full((5,), -100)
    loss, _ = distillation_loss(s, t, labels, kind="jsd", hard_weight=0.3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_global_normalizer_makes_accumulation_exact():
    n, v = 40, 33
    s = _logits(n, v, seed=19).requires_grad_()
    t = _logits(n, v, seed=20)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(21))
    labels[torch.arange(n) % 7 < 3] = -100  # uneven valid counts across the two halves
    full, _ = distillation_loss(s, t, labels, hard_weight=0.5)
    (g_full,) = torch.autograd.grad(full, s)
    count = (labels != -100).sum()
    halves = [slice(0, 13), slice(13, n)]  # unequal micro-batches
    acc = sum(
        distillation_loss(s[h], t[h], labels[h], hard_weight=0.5, normalizer=count)[0]
        for h in halves
    )
    (g_acc,) = torch.autograd.grad(acc, s)
    torch.testing.assert_close(acc, full)
    torch.testing.assert_close(g_acc, g_full)
    # the naive per-micro-batch mean would have been wrong
    naive = sum(distillation_loss(s[h], t[h], labels[h], hard_weight=0.5)[0] for h in halves) / 2
    assert not torch.allclose(naive, full)


def test_cross_entropy_matches_torch_and_ignores():
    s = _logits(2, 6, 17, seed=22)
    labels = torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(23))
    labels[0, :2] = -100
    ce = cross_entropy(s, labels)
    assert ce.shape == (2, 6) and (ce[0, :2] == 0).all()
    ref = torch.nn.functional.cross_entropy(
        s.reshape(-1, 17), labels.reshape(-1), reduction="none"
    ).reshape(2, 6)
    torch.testing.assert_close(ce, ref)


def test_every_kind_and_hyper_combination_is_finite_on_extreme_logits():
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[-80.0, 80.0, 0.0], [1e-3, 0.0, -1e-3]])
    for kind, beta in itertools.product(KINDS, (0.0, 0.3, 1.0)):
        value = divergence(s.clone().requires_grad_(), t, kind, beta=beta)
        assert torch.isfinite(value).all(), (kind, beta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta, alpha", [(0.0, 0.0), (0.5, 0.1), (0.9, 0.3), (1.0, 0.6)])
def test_hand_derived_score_is_the_autograd_derivative_of_the_terms(kind, beta, alpha):
    # The fused engine uses each kind's score (∂terms/∂log_q) instead of autograd; a wrong
    # derivative would train silently in the wrong direction, so pin it to autograd here.
    log_q = torch.log_softmax(_logits(6, 37, seed=1).double(), -1).requires_grad_()
    log_p = torch.log_softmax(_logits(6, 37, seed=2).double(), -1)
    entry = DIVERGENCES[kind]
    (expected,) = torch.autograd.grad(
        entry.terms(log_q, log_p, beta=beta, alpha=alpha).sum(), log_q
    )
    actual = entry.score(log_q.detach(), log_p, beta=beta, alpha=alpha)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
