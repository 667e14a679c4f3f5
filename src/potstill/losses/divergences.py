"""Divergences between a student's and a teacher's next-token distributions.

Every function here is pure: tensors and scalars in, a per-token tensor out. Masking and
normalisation live in :mod:`potstill.losses.objective`, nowhere else.

Notation: ``p`` is the teacher distribution, ``q`` the student's, both over the last dimension
``V`` of the logits and both softened by the same ``temperature``. Directions are named explicitly:

* ``forward_kl``  = KL(p ‖ q)  — mean-seeking; classic Hinton KD.
* ``reverse_kl``  = KL(q ‖ p)  — mode-seeking; MiniLLM / GKD's default.
* ``jsd``         = generalized Jensen–Shannon with TRL's convention (GKD, Agarwal et al. 2024):
  mixture m = (1−β)·q + β·p, loss = β·KL(p ‖ m) + (1−β)·KL(q ‖ m). The endpoints are *defined*
  as β=0 → forward KL and β=1 → reverse KL, while the interior formula tends to 0 there: the
  loss is not continuous at β=0 and β=1 (a β sweep jumps at both ends).
* ``skew_forward_kl`` = KL(p ‖ α·p + (1−α)·q) and ``skew_reverse_kl`` = KL(q ‖ (1−α)·p + α·q)
  (DistiLLM, Ko et al. 2024); α=0 gives plain forward / reverse KL.
* ``tvd``         = ½·Σ|p − q|, total variation distance.

Every value is multiplied by T² so that gradient magnitudes do not shrink as the temperature grows
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2). TRL's GKD / JSD loss
does not multiply by T², so a TRL recipe carries over unchanged only at T=1; at T≠1 potstill's soft
term is T² times TRL's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Every divergence here is a sum over the vocabulary of pointwise terms f(log_q_v, log_p_v). Each
# entry gives those terms and, for the fused engine, their pointwise derivative ∂f/∂log_q (the
# "score"), derived by hand once and checked against autograd in tests/test_losses.py. The chain
# rule through log-softmax, which is the same for every kind, lives in the fused engine.
PointwiseFn = Callable[..., Tensor]  # (log_q, log_p, *, beta, alpha) -> (..., V) fp32


@dataclass(frozen=True)
class Divergence:
    terms: PointwiseFn  # the divergence is terms(...).sum(-1)
    score: PointwiseFn  # ∂terms/∂log_q, pointwise (log_p held fixed)


DIVERGENCES: dict[str, Divergence] = {}
_TINY = torch.finfo(torch.float32).tiny


def _register(name: str, score: PointwiseFn):
    def wrap(terms: PointwiseFn) -> PointwiseFn:
        DIVERGENCES[name] = Divergence(terms, score)
        return terms

    return wrap


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Pointwise terms of KL(p ‖ q): p·(log p − log q). (..., V) -> (..., V)"""
    # p = 0 entries contribute 0 as long as log_p is finite (it is: log_softmax of finite logits
    # never returns -inf in fp32 unless a logit is -inf).
    return log_p.exp() * (log_p - log_q)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_b: float) -> Tensor:
    """log((1−w)·a + w·b). (..., V) -> (..., V)

    From the probabilities (two exps and a log; the fused engine needs a and b anyway) rather than
    logaddexp (two more exps). Where both a and b underflow fp32 the mixture is clamped to the
    smallest normal float: every term that uses it is then weighted by a or b, i.e. by 0.
    """
    mix = (1.0 - weight_b) * log_a.exp() + weight_b * log_b.exp()
    return mix.clamp_min(_TINY).log()


# forward KL = KL(p ‖ q): terms p·(log p − log q); ∂/∂log q = −p.
def _forward_kl_score(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return -log_p.exp()


# reverse KL = KL(q ‖ p): terms q·(log q − log p); ∂/∂log q = q·(log q − log p + 1).
def _reverse_kl_score(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return log_q.exp() * (log_q - log_p + 1.0)


@_register("forward_kl", _forward_kl_score)
def forward_kl(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return _kl_terms(log_p, log_q)  # KL(teacher ‖ student)


@_register("reverse_kl", _reverse_kl_score)
def reverse_kl(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return _kl_terms(log_q, log_p)  # KL(student ‖ teacher)


# JSD_β: ∂/∂q_v = (1−β)·log(q_v / m_v) — the terms through m cancel because Σ (βp + (1−β)q)/m = 1
# pointwise — so ∂/∂log q_v = (1−β)·q_v·(log q_v − log m_v).
def _jsd_score(log_q: Tensor, log_p: Tensor, *, beta: float, **_: float) -> Tensor:
    if beta == 0.0:
        return _forward_kl_score(log_q, log_p)
    if beta == 1.0:
        return _reverse_kl_score(log_q, log_p)
    return (1.0 - beta) * log_q.exp() * (log_q - _log_mix(log_q, log_p, beta))


@_register("jsd", _jsd_score)
def generalized_jsd(log_q: Tensor, log_p: Tensor, *, beta: float, **_: float) -> Tensor:
    if beta == 0.0:  # TRL/GKD convention for the endpoints (see module docstring)
        return _kl_terms(log_p, log_q)
    if beta == 1.0:
        return _kl_terms(log_q, log_p)
    log_m = _log_mix(log_q, log_p, beta)  # m = (1−β)·q + β·p
    return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)


# skew forward: terms p·(log p − log m), m = αp + (1−α)q; ∂/∂log q = −p·(1−α)·q/m.
def _skew_forward_score(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _forward_kl_score(log_q, log_p)
    log_m = _log_mix(log_q, log_p, alpha)
    return -(1.0 - alpha) * (log_p + log_q - log_m).exp()


@_register("skew_forward_kl", _skew_forward_score)
def skew_forward_kl(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _kl_terms(log_p, log_q)
    return _kl_terms(log_p, _log_mix(log_q, log_p, alpha))  # KL(p ‖ α·p + (1−α)·q)


# skew reverse: terms q·(log q − log m), m = (1−α)p + αq; ∂/∂log q = q·(log q − log m + 1 − α·q/m).
def _skew_reverse_score(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _reverse_kl_score(log_q, log_p)
    log_m = _log_mix(log_p, log_q, alpha)
    q = log_q.exp()
    return q * (log_q - log_m + 1.0 - alpha * (log_q - log_m).exp())


@_register("skew_reverse_kl", _skew_reverse_score)
def skew_reverse_kl(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _kl_terms(log_q, log_p)
    return _kl_terms(log_q, _log_mix(log_p, log_q, alpha))  # KL(q ‖ (1−α)·p + α·q)


# TVD: terms ½·|p − q|; ∂/∂log q = −½·sign(p − q)·q (0 where p = q, as autograd gives).
def _tvd_score(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    q = log_q.exp()
    return -0.5 * torch.sign(log_p.exp() - q) * q


@_register("tvd", _tvd_score)
def total_variation(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs()


def check_divergence_args(kind: str, *, temperature: float, beta: float, alpha: float) -> None:
    """Raise a ValueError naming the bad argument; called once per recipe, not per step."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {sorted(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha (skew) must be in [0, 1), got {alpha}")


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-token divergence between student and teacher logits, already scaled by T².

    Args:
        student_logits: ``(..., V)`` any float dtype; upcast to fp32 here.
        teacher_logits: ``(..., V)`` same shape; treated as a constant only if the caller detached it.
        kind: one of :data:`DIVERGENCES` (see the module docstring for directions).
        temperature: softens both distributions; the result is multiplied by ``temperature**2``.
        beta: generalized-JSD mixture weight of the teacher (``jsd`` only).
        alpha: skew coefficient (``skew_forward_kl`` / ``skew_reverse_kl`` only).

    Returns:
        ``(...)`` fp32 tensor of per-token divergences (no masking, no reduction over tokens).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first"
        )
    check_divergence_args(kind, temperature=temperature, beta=beta, alpha=alpha)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    return pointwise_divergence(log_q, log_p, kind, temperature, beta, alpha).sum(-1)


def pointwise_divergence(
    log_q: Tensor, log_p: Tensor, kind: str, temperature: float, beta: float, alpha: float
) -> Tensor:
    """The T²-scaled pointwise terms whose sum over the last dim is the divergence.

    log_q, log_p: (..., V) fp32 log-probabilities at ``temperature`` -> (..., V)
    """
    return DIVERGENCES[kind].terms(log_q, log_p, beta=beta, alpha=alpha) * temperature**2
