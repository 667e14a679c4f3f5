"""Held-out measurement of a student: how close to the teacher, how good on the data.

Metrics (over supervised positions of the held-out set, per token):
* ``teacher_kl``   — forward KL(teacher ‖ student) at T=1, in nats;
* ``teacher_reverse_kl`` — reverse KL(student ‖ teacher) at T=1, in nats;
* ``top1_agreement`` — share of positions where the student's argmax equals the teacher's;
* ``perplexity``   — exp(mean student cross-entropy on the data's labels);
* ``teacher_perplexity`` — the same for the teacher, as the reference point;
* ``bits_per_byte`` — the student's cross-entropy in bits per UTF-8 byte of the text it predicts:
  comparable across tokenizers (given ``byte_lengths``, the bytes each vocabulary entry writes).
And, with :func:`own_sample_metrics` or :func:`score_own_samples`, on completions the student
samples for the held-out prompts:
* ``own_reverse_kl`` — reverse KL(student ‖ teacher) at T=1 per sampled token, in nats;
* ``own_distinct_2`` — :func:`distinct_n` of the samples' token pairs: near 0 for a student
  collapsed into repeating a few tokens;
* ``own_repetition`` — :func:`repetition` (4-grams): near 1 for the same collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

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
    sums = dict.fromkeys(
        ("teacher_kl", "teacher_reverse_kl", "top1_agreement", "student_nll", "teacher_nll"), 0.0
    )
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
            sums["teacher_reverse_kl"] += divergence(s_logits, t_logits, "reverse_kl").sum().item()
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
            teacher_reverse_kl=sums["teacher_reverse_kl"] / n,
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
    caller so every evaluation draws alike), and :func:`score_own_samples` measures them.
    """
    batches = list(batches)
    was_training = student.training
    student.eval()
    prompts, completions = [], []
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        asked = batch_prompts(batch, ignore_index)
        prompts.extend(asked)
        completions.extend(sample(asked, i))
    out = score_own_samples(
        student,
        teacher,
        prompts,
        completions,
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
        autocast_dtype=autocast_dtype,
        batch_size=max((len(b["input_ids"]) for b in batches), default=1),
        device=batches[0]["input_ids"].device if batches else None,
    )
    if was_training:
        student.train()
    return out


@torch.no_grad()
def score_own_samples(
    student: nn.Module,
    teacher: nn.Module | None,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    vocab_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """What a student's own samples (token ids, EOS included, one per prompt) say of it: the
    reverse KL to the ``teacher`` per sampled token (both models score those very tokens; left
    out without a teacher), the mean sampled length, and their diversity: distinct-2 over all of
    them and the repetition of 4-grams within each, where a collapsed student shows."""
    was_training = student.training
    student.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(prompts) if teacher is not None else 0, batch_size):
        own = completion_batch(
            prompts[start : start + batch_size],
            completions[start : start + batch_size],
            pad_token_id=pad_token_id,
            device=device,
        )
        mask = own["labels"] != -100  # (B, T) completion tokens only
        s_logits = supervised_logits(student, own, mask, vocab_size, autocast_dtype)  # (N, V)
        t_logits = supervised_logits(teacher, own, mask, vocab_size, autocast_dtype)  # (N, V)
        total += divergence(s_logits, t_logits, "reverse_kl").sum().item()
        tokens += int(mask.sum())
    if was_training:
        student.train()
    out = {
        "own_sample_tokens": sum(map(len, completions)) / max(len(completions), 1),
        "own_distinct_2": distinct_n(completions, 2),
        "own_repetition": repetition(completions, 4),
    }
    if teacher is not None:
        out["own_reverse_kl"] = total / max(tokens, 1)
    return out
