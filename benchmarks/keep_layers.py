"""Which 6 of SmolLM2-135M-Instruct's 30 layers make the best pruned start: teacher KL of each
layer set on the demo's 48 held-out gsm_symbolic problems, for hand-picked sets (evenly spread,
the first a and last 6 - a) and for a greedy search that adds, one at a time, the layer whose
addition lowers the teacher KL most on a few *training* records (calibration), starting from the
first and last layers (a short form of the depth-importance searches of Minitron, Muralidharan et
al. 2024, and ShortGPT, Men et al. 2024, with the teacher's own distribution as the criterion).

    python benchmarks/keep_layers.py                   # hand-picked sets, then the greedy search
    python benchmarks/keep_layers.py --calibration 32  # more calibration records

The start's KL is not the trained student's: train the picks with the demo's recipe to compare
them (`potstill demo student.keep_layers=[...]`; docs/methods/token_level.md has the figures).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _pair import cpu_name
from torch import nn

from potstill.data import load_records, tokenize_records
from potstill.demo import DEMO_OVERRIDES
from potstill.evaluate import supervised_logits
from potstill.losses import divergence
from potstill.models import decoder_layers, load_model, load_tokenizer
from potstill.prepare import load_data
from potstill.recipe import load_recipe
from potstill.train import fixed_batches
from potstill.utils import pad_token_id

TEACHER = "bundled:smollm2-135m-instruct"
KEEP = 6


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: list[int]):
    """The model with only the decoder layers ``keep`` for the block (no copy; put back after)."""
    holder, attr = decoder_layers(model)
    every = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList([every[i] for i in keep]))
    try:
        yield model
    finally:
        setattr(holder, attr, every)


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """(N, V) logits at the batch's supervised positions, as the held-out evaluation takes them."""
    return supervised_logits(model, batch, batch["labels"] != -100, None, None)


class Scorer:
    """Teacher KL (forward, nats per supervised token) of a layer subset on fixed batches, the
    teacher's logits computed once."""

    def __init__(self, model: nn.Module, batches: list[dict]):
        self.model, self.batches = model, batches
        with torch.no_grad():
            self.teacher = [logits(model, b) for b in batches]

    @torch.no_grad()
    def __call__(self, keep: list[int]) -> float:
        total, tokens = 0.0, 0
        with only_layers(self.model, keep):
            for batch, t in zip(self.batches, self.teacher, strict=True):
                total += float(divergence(logits(self.model, batch), t, "forward_kl").sum())
                tokens += t.shape[0]
        return total / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibration", type=int, default=16, help="training records to search on")
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TEACHER)
    model = load_model(TEACHER, dtype="float32").eval().requires_grad_(False)
    layers = model.config.num_hidden_layers
    pad = pad_token_id(tokenizer)
    recipe = load_recipe(None, list(DEMO_OVERRIDES))
    held = load_data(recipe, tokenizer, held_out_only=True).eval
    held_out = Scorer(model, fixed_batches(held, batch_size=8, pad_id=pad))
    calibration, _ = tokenize_records(
        load_records(recipe.data.train, limit=args.calibration), tokenizer, max_length=256
    )
    search = Scorer(model, fixed_batches(calibration, batch_size=8, pad_id=pad))

    print(f"{cpu_name()}; teacher KL of the pruned start on 48 held-out problems")
    picks = {"evenly spread (the former demo)": [0, 6, 12, 18, 24, 29]}
    for a in range(1, KEEP):
        picks[f"first {a}, last {KEEP - a}"] = [*range(a), *range(layers - KEEP + a, layers)]
    for name, keep in picks.items():
        print(f"  {name:34s} {keep}  {held_out(keep):.3f}", flush=True)

    keep, started = [0, layers - 1], time.perf_counter()
    while len(keep) < KEEP:
        scores = {i: search(sorted([*keep, i])) for i in range(layers) if i not in keep}
        keep = sorted([*keep, min(scores, key=scores.get)])
        print(f"  greedy: {keep}  calibration KL {min(scores.values()):.3f}", flush=True)
    print(
        f"  greedy search ({args.calibration} records, {time.perf_counter() - started:.0f} s) "
        f"{keep}  {held_out(keep):.3f}"
    )


if __name__ == "__main__":
    main()
