"""Held-out measurement of a student: how close to the teacher, how good on the data.

Metrics (over supervised positions of the held-out set, per token):
* ``teacher_kl``   — forward KL(teacher ‖ student) at T=1, in nats;
* ``top1_agreement`` — share of positions where the student's argmax equals the teacher's;
* ``perplexity``   — exp(mean student cross-entropy on the data's labels);
* ``teacher_perplexity`` — the same for the teacher, as the reference point;
* ``bits_per_byte`` — the student's cross-entropy in bits per UTF-8 byte of the text it predicts:
  comparable across tokenizers (given ``byte_lengths``, the bytes each vocabulary entry writes).
And, with :func:`own_sample_metrics`, on completions the student samples for the held-out prompts:
* ``own_reverse_kl`` — reverse KL(student ‖ teacher) at T=1 per sampled token, in nats;
* ``own_distinct_2`` — :func:`distinct_n` of the samples' token pairs: near 0 for a student
  collapsed into repeating a few tokens;
* ``own_repetition`` — :func:`repetition` (4-grams): near 1 for the same collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from potstill.data import batch_prompts, completion_batch
from potstill.lm import final_hidden, head_logits
from potstill.losses import cross_entropy, divergence

LN2 = math.log(2.0)


def token_byte_lengths(tokenizer) -> Tensor | None:
    """(V,) bytes each entry of ``tokenizer`` writes, or None when it has no fast backend."""
    from potstill.data.alignment import byte_lengths

    try:
        return torch.tensor(byte_lengths(tokenizer), dtype=torch.float64)
    except Exception:  # a slow or stand-in tokenizer: bits per byte is simply not reported
        return None


def supervised_logits(
    model: nn.Module,
    batch: dict[str, Tensor],
    mask: Tensor,
    vocab_size: int | None,
    autocast_dtype: torch.dtype | None,
) -> Tensor:
    """``model``'s logits at the ``mask``ed positions of ``batch``, under autocast when a dtype is
    given: (B, T) mask -> (N, V)."""
    device = batch["input_ids"].device
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        return head_logits(model, final_hidden(model, batch)[mask], vocab_size)


@torch.no_grad()
def evaluate(
    student: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    ignore_index: int = -100,
    byte_lengths: Tensor | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Average the metrics above over ``batches`` (collated, on the right device)."""
    was_training = student.training
    student.eval()
    sums = {"teacher_kl": 0.0, "top1_agreement": 0.0, "student_nll": 0.0, "teacher_nll": 0.0}
    tokens, nbytes = 0, 0.0
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        labels = batch["labels"]  # (B, T)
        mask = labels != ignore_index
        s_logits = supervised_logits(student, batch, mask, vocab_size, autocast_dtype)  # (N, V)
        t_logits = None
        if teacher is not None:
            t_logits = supervised_logits(teacher, batch, mask, vocab_size, autocast_dtype)
        y = labels[mask]  # (N,)
        tokens += y.numel()
        if byte_lengths is not None:
            nbytes += float(byte_lengths[y.cpu()].sum())
        sums["student_nll"] += cross_entropy(s_logits, y).sum().item()
        if t_logits is not None:
            sums["teacher_kl"] += divergence(s_logits, t_logits, "forward_kl").sum().item()
            sums["top1_agreement"] += (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
            sums["teacher_nll"] += cross_entropy(t_logits, y).sum().item()
    if was_training:
        student.train()
    n = max(tokens, 1)
    out = {
        "eval_tokens": float(tokens),
        "nll": sums["student_nll"] / n,
        "perplexity": math.exp(sums["student_nll"] / n),
    }
    if byte_lengths is not None and nbytes > 0:
        out["bits_per_byte"] = sums["student_nll"] / nbytes / LN2
    if teacher is not None:
        out.update(
            teacher_kl=sums["teacher_kl"] / n,
            top1_agreement=sums["top1_agreement"] / n,
            teacher_perplexity=math.exp(sums["teacher_nll"] / n),
        )
    return out


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function"): the number of
    distinct n-grams over the number of n-grams, counted over all ``samples`` (token ids)
    together. 1 when no n-gram recurs; 1/count when every one is the same; NaN without any."""
    grams = [g for sample in samples for g in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition(samples: Sequence[Sequence[int]], n: int = 4) -> float:
    """seq-rep-n (Welleck et al., 2019, "Neural Text Generation with Unlikelihood Training"): per
    sample, the share of its n-grams that repeat an earlier one of the same sample
    (1 − distinct / count), averaged over the samples long enough to hold one; NaN if none is."""
    shares = [1 - len(set(g)) / len(g) for g in (_ngrams(s, n) for s in samples) if g]
    return sum(shares) / len(shares) if shares else math.nan


@torch.no_grad()
def own_sample_metrics(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    sample: Callable[[list[list[int]], int], list[list[int]]],
    *,
    pad_token_id: int,
    vocab_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    ignore_index: int = -100,
    progress: bool = False,
    desc: str = "own samples",
) -> dict[str, float]:
    """Reverse KL(student ‖ teacher) at T=1 on completions the student samples itself, per token.

    The quantity on-policy distillation minimises (GKD, Agarwal et al. 2024): the held-out prompts
    of ``batches`` are completed by ``sample(prompts, batch_index)`` (the student, seeded by the
    caller so every evaluation draws alike), and both models score those very tokens, EOS
    included. Also returns the mean sampled length and the samples' diversity (distinct-2 over
    all of them, repetition of 4-grams within each), where a collapsed student shows.
    """
    was_training = student.training
    student.eval()
    total, tokens, drawn = 0.0, 0, []
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        prompts = batch_prompts(batch, ignore_index)
        completions = sample(prompts, i)
        own = completion_batch(
            prompts, completions, pad_token_id=pad_token_id, device=batch["input_ids"].device
        )
        mask = own["labels"] != ignore_index  # (B, T) completion tokens only
        s_logits = supervised_logits(student, own, mask, vocab_size, autocast_dtype)  # (N, V)
        t_logits = supervised_logits(teacher, own, mask, vocab_size, autocast_dtype)  # (N, V)
        total += divergence(s_logits, t_logits, "reverse_kl").sum().item()
        tokens += int(mask.sum())
        drawn.extend(completions)
    if was_training:
        student.train()
    return {
        "own_reverse_kl": total / max(tokens, 1),
        "own_sample_tokens": tokens / max(len(drawn), 1),
        "own_distinct_2": distinct_n(drawn, 2),
        "own_repetition": repetition(drawn, 4),
    }


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Direction:
    """How a held-out metric reads: its words, which way is better, how a value prints."""

    words: str
    lower_is_better: bool
    fmt: str


# the metrics a verdict weighs, in the order it names them
DIRECTIONS = {
    "teacher_kl": Direction("held-out teacher KL", True, "{:.3f}"),
    "top1_agreement": Direction("top-1 agreement", False, "{:.1%}"),
    "perplexity": Direction("perplexity", True, "{:.2f}"),
    "bits_per_byte": Direction("bits per byte", True, "{:.3f}"),
    "own_reverse_kl": Direction("reverse KL on its own samples", True, "{:.3f}"),
    "own_distinct_2": Direction("distinct-2 of its own samples", False, "{:.2f}"),
}


def verdict(name: str, run: dict[str, float], other_name: str, other: dict[str, float]) -> str:
    """One computed sentence comparing two runs' held-out metrics (those both have, finite):
    where ``name`` is better, where worse, with the figures, e.g. "the KD student is better than
    the CE baseline on held-out teacher KL (1.790 vs 2.220) but worse on perplexity (20.10 vs
    18.30)". Equal values are named as ties."""
    better, worse, tied = [], [], []
    for key, d in DIRECTIONS.items():
        a, b = run.get(key), other.get(key)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        said = f"{d.words} ({d.fmt.format(a)} vs {d.fmt.format(b)})"
        if d.fmt.format(a) == d.fmt.format(b):
            tied.append(said)
        elif (a < b) == d.lower_is_better:
            better.append(said)
        else:
            worse.append(said)
    if not (better or worse or tied):
        return f"{name} and {other_name} share no held-out metric"
    parts = []
    if better:
        parts.append(f"better than {other_name} on {_listed(better)}")
    if worse:
        parts.append(("but " if better else "") + f"worse on {_listed(worse)}")
    if tied:
        parts.append(("and " if parts else "") + f"level on {_listed(tied)}")
    if not better and worse:
        parts[0] = parts[0].replace("worse on", f"worse than {other_name} on", 1)
    return f"{name} is " + " ".join(parts)


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
