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
@pytest.mark.parametrize("cap", [None, 3.0], ids=["fused", "softcap-checkpointed"])
def test_ragged_rows_padded_with_absent_entries_equal_each_row_at_its_own_k(kind, cap):
    """A coverage-rule cache keeps k_i entries in row i; padded to max k with −inf and a repeated
    id, the loss and gradients equal the sum of each row's own k_i-entry coarsening."""
    hs, w, t_logits, labels, _ = problem(n=6, k=6, seed=4)
    keep = labels != -100
    hs_k, labels_k = hs[keep], labels[keep]  # (n, H), (n,)
    log_p = torch.log_softmax(t_logits[keep], -1)
    top, ids = log_p.topk(6, -1)  # (n, 6)
    counts = torch.tensor([1, 3, 6, 2, 5])[: labels_k.shape[0]]
    present = torch.arange(6) < counts[:, None]
    pad_ids = torch.where(present, ids, ids[:, :1])  # absent: the row's first id again
    pad_lp = torch.where(present, top, float("-inf"))
    kw = dict(kind=kind, temperature=2.0, hard_weight=0.2, softcap=cap)
    sums = sparse_distill_sums(hs_k, w, labels_k, pad_ids, pad_lp, **kw)
    grads = torch.autograd.grad(sums.loss, (hs, w))
    ref = sum(
        sparse_distill_sums(
            hs[keep][i : i + 1],
            w,
            labels_k[i : i + 1],
            ids[i : i + 1, :c],
            top[i : i + 1, :c],
            **kw,
        ).loss
        for i, c in enumerate(counts.tolist())
    )
    ref_grads = torch.autograd.grad(ref, (hs, w))
    torch.testing.assert_close(sums.loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


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


def tail_samples(t_logits, ids, m, temperature=1.0, seed=0):
    """m draws per row from the teacher's distribution outside ``ids``, and that tail's entropy."""
    p = torch.softmax(t_logits / temperature, -1).scatter(1, ids, 0.0)  # (n, V) the tail
    tail = p / p.sum(-1, keepdim=True)
    draws = torch.multinomial(
        tail, m, replacement=True, generator=torch.Generator().manual_seed(seed)
    )
    entropy = -(tail * tail.clamp_min(1e-30).log()).sum(-1)
    return draws, entropy


@pytest.mark.parametrize("cap", [None, 3.0], ids=["fused", "softcap-checkpointed"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_samples_add_the_sampled_tail_kl_exactly(cap, temperature):
    """Loss and gradients against a naive [N, V] evaluation of coarse KL + T²·P_o·(−H(p̃) −
    mean log q̃(samples))."""
    hs, w, t_logits, labels, k = problem()
    keep = labels != -100
    ref, ids, top = naive(hs, w, t_logits, labels, k, kind="forward_kl", temperature=temperature,
                          hard=0.3, cap=cap)  # fmt: skip
    draws, entropy = tail_samples(t_logits[keep], ids, m=7, temperature=temperature)
    logits = hs @ w.T if cap is None else cap * torch.tanh((hs @ w.T) / cap)
    log_q = torch.log_softmax(logits[keep] / temperature, -1)  # (n, V)
    rest = torch.ones_like(log_q, dtype=torch.bool).scatter(1, ids, False)
    log_q_other = torch.where(rest, log_q, float("-inf")).logsumexp(-1)  # (n,)
    p_other = 1 - top.exp().sum(-1)  # (n,)
    cross = -(log_q.gather(1, draws) - log_q_other[:, None]).mean(-1)
    ref = ref + (temperature**2 * p_other * (cross - entropy)).sum()
    ref_grads = torch.autograd.grad(ref, (hs, w))
    sums = sparse_distill_sums(
        hs[keep], w, labels[keep], ids, top, teacher_tail=draws, teacher_tail_entropy=entropy,
        temperature=temperature, hard_weight=0.3, softcap=cap,
    )  # fmt: skip
    grads = torch.autograd.grad(sums.loss, (hs, w))
    torch.testing.assert_close(sums.loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="forward KL only"):
        sparse_distill_sums(hs[keep], w, labels[keep], ids, top, teacher_tail=draws,
                            teacher_tail_entropy=entropy, kind="reverse_kl")  # fmt: skip


def test_tail_samples_make_the_sparse_kl_an_unbiased_estimate_of_the_dense_one():
    """With many samples the sparse loss and gradient approach the dense forward KL's; the top-k
    coarsening alone is biased (it ignores the tail's shape)."""
    hs, w, t_logits, labels, k = problem(n=6, v=60, k=4, seed=5)
    keep = labels != -100
    hs_k, labels_k = hs[keep].detach().requires_grad_(), labels[keep]
    log_p = torch.log_softmax(t_logits[keep], -1)
    top, ids = log_p.topk(k, -1)
    dense = divergence(hs_k @ w.T, t_logits[keep], "forward_kl").sum()
    dense_grad = torch.autograd.grad(dense, hs_k)[0]
    errors = {}
    for name, extra in [("coarse", {}), ("sampled", None)]:
        if extra is None:
            draws, entropy = tail_samples(t_logits[keep], ids, m=200_000, seed=1)
            extra = {"teacher_tail": draws, "teacher_tail_entropy": entropy}
        sums = sparse_distill_sums(hs_k, w, labels_k, ids, top, **extra)
        grad = torch.autograd.grad(sums.loss, hs_k)[0]
        errors[name] = (
            abs(float(sums.loss.detach() - dense.detach())),
            float((grad - dense_grad).norm()),
        )
    assert errors["sampled"][0] < 0.01 * float(dense.detach()) < errors["coarse"][0]
    assert errors["sampled"][1] < 0.2 * errors["coarse"][1]
