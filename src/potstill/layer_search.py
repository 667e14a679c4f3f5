"""Which layers a pruned student keeps: a greedy search on the full model's own distribution.

A student pruned to n of a model's L layers starts far from it or close to it depending on which
layers it keeps, and a short distillation run ends roughly in the same order (measured on the
bundled pair: teacher KL after the demo's run 1.79 from evenly spread layers, 1.21 from this
search's pick; docs/methods/token_level.md). The search starts from the first and last layers and,
round by round, adds the layer whose addition lowers the forward KL (full model ‖ pruned model,
nats per supervised token) most on a few calibration records, until n are kept: (L - 2) + (L - 3)
+ … candidate passes, each over the calibration batches only. It is a short form of the depth-
importance searches of ShortGPT (Men et al. 2024) and Minitron (Muralidharan et al. 2024), with
the model's own next-token distribution as the criterion.

Memory: the full model's logits at every supervised calibration position are kept, in float32
(positions × vocabulary × 4 bytes: ~0.6 GiB for 16 grade-school maths records at a 49k vocabulary).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from potstill.evaluate import supervised_logits
from potstill.losses import DIVERGENCES
from potstill.models import only_layers

FORWARD_KL = DIVERGENCES["forward_kl"]  # KL(full ‖ pruned): terms(log_q, log_p).sum(-1)


def evenly_spread(num_layers: int, n: int) -> list[int]:
    """n layer indices from first to last, as evenly spaced as integers allow (n >= 2)."""
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


class KLScorer:
    """Forward KL (full model ‖ the same model with only some layers), nats per supervised token,
    on fixed batches; the full model's logits computed once."""

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, Tensor]]):
        self.model, self.batches = model, list(batches)
        with torch.no_grad():  # the full model's log-probabilities, normalised once
            self.full = [self._log_probs(b) for b in self.batches]  # (N_b, V) per batch

    def _log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        logits = supervised_logits(self.model, batch, batch["labels"] != -100, None, None)
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, keep: list[int]) -> float:
        total, tokens = 0.0, 0
        with only_layers(self.model, keep):
            for batch, full in zip(self.batches, self.full, strict=True):
                total += float(FORWARD_KL.terms(self._log_probs(batch), full).sum())
                tokens += full.shape[0]
        return total / max(tokens, 1)


@dataclass
class Round:
    keep: list[int]  # the layers kept after this round
    kl: float  # its calibration KL
    candidates: int  # layer sets scored in the round
    seconds: float


def greedy_layers(
    score: Callable[[list[int]], float],
    num_layers: int,
    n: int,
    *,
    start: Sequence[int] | None = None,
    progress: bool = True,
) -> Iterator[Round]:
    """Grow ``start`` (default: the first and last layer) to ``n`` layers, each round adding the
    layer whose set ``score`` rates lowest; yields one :class:`Round` as each layer is added
    (ties: the lower index)."""
    keep = sorted(start if start is not None else {0, num_layers - 1})
    if not 0 < len(keep) <= n <= num_layers:
        raise ValueError(f"cannot grow {len(keep)} start layers to {n} of {num_layers}")
    while len(keep) < n:
        began = time.perf_counter()
        candidates = [i for i in range(num_layers) if i not in keep]
        bar = tqdm(
            candidates, desc=f"layer {len(keep) + 1} of {n}", disable=not progress, leave=False
        )
        scores = {i: score(sorted([*keep, i])) for i in bar}
        best = min(candidates, key=lambda i: (scores[i], i))
        keep = sorted([*keep, best])
        yield Round(keep, scores[best], len(candidates), time.perf_counter() - began)


def calibration_batches(
    recipe, tokenizer, records: int, *, batch_size: int = 8, device: str = "cpu"
) -> list[dict[str, Tensor]]:
    """The first ``records`` records of ``recipe``'s ``data.train``, tokenized as training reads
    them and collated on ``device``: what the search scores on."""
    from potstill.data import load_records, tokenize_records
    from potstill.errors import DataError
    from potstill.train import fixed_batches
    from potstill.utils import pad_token_id

    d = recipe.data
    examples, _ = tokenize_records(
        load_records(d.train, split=d.train_split, limit=records),
        tokenizer,
        max_length=d.max_length,
    )
    if not examples:
        raise DataError(f"no record of {d.train} keeps a target token to score on")
    pad = pad_token_id(tokenizer)
    return fixed_batches(examples, batch_size=batch_size, pad_id=pad, device=device)


def pick_layers(recipe, n: int, *, records: int = 16, batch_size: int = 8) -> list[int]:
    """The ``pick-layers`` command: search which ``n`` layers of the model that ``recipe``'s
    ``student.init: prune`` prunes (``student.model``, else ``teacher.model``) to keep, on the
    first ``records`` records of ``data.train``; prints each round and returns the pick."""
    from potstill.errors import RecipeError
    from potstill.methods import method_info
    from potstill.models import decoder_layers, load_model, load_tokenizer

    if method_info(recipe.method).encoder:
        raise RecipeError(
            f"pick-layers scores next-token distributions; method {recipe.method} trains a "
            "sentence encoder: pick its layers by hand (student.keep_layers)"
        )
    source, s = recipe.student.model or recipe.teacher.model, recipe.student
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source, trust_remote_code=s.trust_remote_code)
    model = load_model(
        source, dtype=s.dtype, trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle
    )
    model = model.to(device).eval().requires_grad_(False)
    holder, attr = decoder_layers(model)
    num_layers = len(getattr(holder, attr))
    if not 2 <= n < num_layers:
        raise RecipeError(f"--layers must be 2 to {num_layers - 1} ({source} has {num_layers})")
    batches = calibration_batches(recipe, tokenizer, records, batch_size=batch_size, device=device)
    score = KLScorer(model, batches)
    tokens = sum(f.shape[0] for f in score.full)
    print(
        f"pick-layers: {n} of the {num_layers} layers of {source}, by the KL to the full model on "
        f"{sum(len(b['input_ids']) for b in batches)} records of {recipe.data.train} "
        f"({tokens:,} supervised tokens, {device})"
    )
    spread = evenly_spread(num_layers, n)
    print(f"  evenly spread {spread}: KL {score(spread):.3f}")
    if s.keep_layers and len(s.keep_layers) == n and s.keep_layers != spread:
        print(f"  the recipe's {list(s.keep_layers)}: KL {score(list(s.keep_layers)):.3f}")
    keep = [0, num_layers - 1]  # n = 2: the start is the pick
    for r in greedy_layers(score, num_layers, n):
        print(f"  {r.keep}: KL {r.kl:.3f} (best of {r.candidates}, {r.seconds:.0f} s)", flush=True)
        keep = r.keep
    prune = "" if s.init == "prune" else "student.init=prune "  # the layers apply when pruning
    print(f"{prune}student.keep_layers={keep}")
    return keep
