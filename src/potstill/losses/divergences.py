"""Divergences between a student's and a teacher's next-token distributions.

Every function here is pure: tensors and scalars in, a per-token tensor out. Masking and
normalisation live in :mod:`potstill.losses.objective`, nowhere else.

Notation: ``p`` is the teacher distribution, ``q`` the student's, both over the last dimension
``V`` of the logits and both softened by the same ``temperature``. Directions are named explicitly:

* ``forward_kl``  = KL(p ‖ q)  — mean-seeking; classic Hinton KD.
* ``reverse_kl``  = KL(q ‖ p)  — mode-seeking; MiniLLM / GKD's default.
* ``jsd``         = generalized Jensen–Shannon with TRL's convention (GKD, Agarwal et al. 2024):
  mixture m = (1−β)·q + β·p, loss = β·KL(p ‖ m) + (1−β)·KL(q ‖ m); the endpoints are defined as
  β=0 → forward KL and β=1 → reverse KL (the interior formula itself tends to 0 there), so a
  recipe moves between TRL and potstill unchanged.
* ``skew_forward_kl`` = KL(p ‖ α·p + (1−α)·q) and ``skew_reverse_kl`` = KL(q ‖ (1−α)·p + α·q)
  (DistiLLM, Ko et al. 2024); α=0 gives plain forward / reverse KL.
* ``tvd``         = ½·Σ|p − q|, total variation distance.

Every value is multiplied by T² so that gradient magnitudes do not shrink as the temperature grows
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# A per-chunk divergence: log-probabilities in (fp32, same shape (N, V)), per-token values out (N,).
DivergenceFn = Callable[..., Tensor]
DIVERGENCES: dict[str, DivergenceFn] = {}


def _register(name: str):
    def wrap(fn: DivergenceFn) -> DivergenceFn:
        DIVERGENCES[name] = fn
        return fn

    return wrap


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim from log-probabilities. (N, V) -> (N,)"""
    # exp(log_p) * (log_p - log_q): p = 0 rows contribute 0 as long as log_p is finite (it is:
    # log_softmax of finite logits never returns -inf in fp32 unless a logit is -inf).
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_b: float) -> Tensor:
    """log((1−w)·a + w·b), computed stably in log space. (N, V) -> (N, V)"""
    return torch.logaddexp(log_a + math.log1p(-weight_b), log_b + math.log(weight_b))


@_register("forward_kl")
def forward_kl(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return _kl(log_p, log_q)  # KL(teacher ‖ student)


@_register("reverse_kl")
def reverse_kl(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return _kl(log_q, log_p)  # KL(student ‖ teacher)


@_register("jsd")
def generalized_jsd(log_q: Tensor, log_p: Tensor, *, beta: float, **_: float) -> Tensor:
    if beta == 0.0:  # TRL/GKD convention for the endpoints (see module docstring)
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_q, log_p, beta)  # m = (1−β)·q + β·p
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


@_register("skew_forward_kl")
def skew_forward_kl(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _kl(log_p, log_q)
    return _kl(log_p, _log_mix(log_q, log_p, alpha))  # KL(p ‖ α·p + (1−α)·q)


@_register("skew_reverse_kl")
def skew_reverse_kl(log_q: Tensor, log_p: Tensor, *, alpha: float, **_: float) -> Tensor:
    if alpha == 0.0:
        return _kl(log_q, log_p)
    return _kl(log_q, _log_mix(log_p, log_q, alpha))  # KL(q ‖ (1−α)·p + α·q)


@_register("tvd")
def total_variation(log_q: Tensor, log_p: Tensor, **_: float) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


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
    return DIVERGENCES[kind](log_q, log_p, beta=beta, alpha=alpha) * temperature**2
