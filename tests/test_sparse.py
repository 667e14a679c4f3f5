"""The top-k (sparse) teacher loss: parity with a naive dense evaluation of the same coarsening
(loss and gradients), and properties of the coarsening."""

from __future__ import annotations

import pytest
import torch

from potstill.losses import DIVERGENCES, divergence
from potstill.losses.sparse import sparse_distill_sums

KINDS = sorted(DIVERGENCES)


def problem(n=7, h=8, v=30, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    teacher_logits = 2 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return hs, w, teacher_logits, labels, k


def naive(
    hs, w, teacher_logits, labels, k, *, kind, temperature, beta=0.5, alpha=0.1, hard=0.0, cap=None
):
    """Full [N, V] logits; the "other" events summed entry by entry over the non-top-k ids."""
    keep = labels != -100
    logits = hs @ w.T if cap is None else cap * torch.tanh((hs @ w.T) / cap)  # (N, V)
    s = logits[keep] / temperature  # (n, V)
    log_p_full = torch.log_softmax(teacher_logits[keep] / temperature, -1)
    top, ids = log_p_full.topk(k, -1)  # (n, k)
    rest = torch.ones_like(s, dtype=torch.bool).scatter(1, ids, False)  # (n, V) non-top-k
    log_q_full = torch.log_softmax(s, -1)
    q_other = torch.where(rest, log_q_full.exp(), 0.0).sum(-1, keepdim=True).log()
    p_other = torch.where(rest, log_p_full.exp(), 0.0).sum(-1, keepdim=True).log()
    log_q = torch.cat([log_q_full.gather(1, ids), q_other], -1)  # (n, k+1)
    log_p = torch.cat([top, p_other], -1)
    terms = DIVERGENCES[kind].terms(log_q, log_p, beta=beta, alpha=alpha) * temperature**2
    loss = terms.sum()
    if hard:
        ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        loss = loss + hard * ce
    return loss, ids, top


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("cap", [None, 3.0], ids=["fused", "softcap-checkpointed"])
def test_sparse_loss_and_gradients_match_the_naive_coarsening(kind, temperature, cap):
    hs, w, t_logits, labels, k = problem()
    ref, ids, top = naive(
        hs, w, t_logits, labels, k, kind=kind, temperature=temperature, hard=0.3, cap=cap
    )
    ref_grads = torch.autograd.grad(ref, (hs, w))
    # the cache's view: ids and log-probs at every row (rows with ignore_index hold anything)
    full_ids = torch.zeros(labels.shape[0], k, dtype=torch.long)
    full_lp = torch.full((labels.shape[0], k), -1.0)
    keep = labels != -100
    full_ids[keep], full_lp[keep] = ids, top
    sums = sparse_distill_sums(
        hs, w, labels, full_ids, full_lp, kind=kind, temperature=temperature, hard_weight=0.3,
        softcap=cap,
    )  # fmt: skip
    grads = torch.autograd.grad(sums.loss, (hs, w))
    torch.testing.assert_close(sums.loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert set(sums.terms) == {"soft", "hard"}


@pytest.mark.parametrize("kind", KINDS)
def test_with_every_entry_kept_the_sparse_loss_is_the_dense_one(kind):
    hs, w, t_logits, labels, _ = problem(k=30)
    v = w.shape[0]
    log_p = torch.log_softmax(t_logits, -1)
    ids = torch.arange(v).expand(labels.shape[0], v)
    sums = sparse_distill_sums(hs, w, labels, ids, log_p, kind=kind)
    keep = labels != -100
    dense = divergence((hs @ w.T)[keep], t_logits[keep], kind).sum()
    torch.testing.assert_close(sums.loss, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd", "jsd"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_coarsening_never_raises_an_f_divergence(kind, k):
    """Pooling events can only lose information (the data-processing inequality)."""
    hs, w, t_logits, labels, _ = problem(k=k, seed=k)
    _, ids, top = naive(hs, w, t_logits, labels, k, kind=kind, temperature=1.0)
    keep = labels != -100
    with torch.no_grad():
        sums = sparse_distill_sums(hs[keep], w, labels[keep], ids, top, kind=kind)
        dense = divergence((hs @ w.T)[keep], t_logits[keep], kind).sum()
    assert float(sums.loss) <= float(dense) + 1e-5


def test_identical_distributions_give_zero_and_bad_shapes_are_refused():
    hs, w, _, labels, k = problem()
    log_p = torch.log_softmax(hs @ w.T, -1).detach()
    top, ids = log_p.topk(k, -1)
    sums = sparse_distill_sums(hs, w, labels, ids, top, kind="reverse_kl")
    assert abs(float(sums.loss.detach())) < 1e-5
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        sparse_distill_sums(hs, w, labels, ids[:, :2], top)


@pytest.mark.slow
def test_compiled_sparse_matches_eager():
    hs, w, t_logits, labels, k = problem(n=40, v=70, k=6, seed=3)
    _, ids, top = naive(hs, w, t_logits, labels, k, kind="jsd", temperature=1.0)
    keep = labels != -100
    kw = dict(kind="jsd", beta=0.3, hard_weight=0.2, chunk_size=16)
    out = []
    for compiled in (False, True):
        sums = sparse_distill_sums(hs[keep], w, labels[keep], ids, top, compile=compiled, **kw)
        out.append((sums.loss, *torch.autograd.grad(sums.loss, (hs, w))))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
