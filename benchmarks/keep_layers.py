"""Which 6 of SmolLM2-135M-Instruct's 30 layers make the best pruned start: teacher KL of each
layer set on the demo's 48 held-out gsm_symbolic problems, for hand-picked sets (evenly spread,
the first a and last 6 - a) and for the greedy search of `potstill pick-layers`
(`potstill.layer_search`: from the first and last layers, add one at a time the layer whose
addition lowers the teacher KL most on a few *training* records).

    python benchmarks/keep_layers.py                   # hand-picked sets, then the greedy search
    python benchmarks/keep_layers.py --calibration 32  # more calibration records

The start's KL is not the trained student's: train the picks with the demo's recipe to compare
them (`potstill demo student.keep_layers=[...]`; docs/methods/token_level.md has the figures).
"""

from __future__ import annotations

import argparse

import torch
from _pair import cpu_name

from potstill.demo import DEMO_OVERRIDES
from potstill.layer_search import KLScorer, calibration_batches, greedy_layers
from potstill.models import load_model, load_tokenizer
from potstill.prepare import load_data
from potstill.recipe import load_recipe
from potstill.train import fixed_batches
from potstill.utils import pad_token_id

TEACHER = "bundled:smollm2-135m-instruct"
KEEP = 6


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
    held_out = KLScorer(model, fixed_batches(held, batch_size=8, pad_id=pad))
    search = KLScorer(model, calibration_batches(recipe, tokenizer, args.calibration))

    print(f"{cpu_name()}; teacher KL of the pruned start on 48 held-out problems")
    picks = {"evenly spread (the former demo)": [0, 6, 12, 18, 24, 29]}
    for a in range(1, KEEP):
        picks[f"first {a}, last {KEEP - a}"] = [*range(a), *range(layers - KEEP + a, layers)]
    for name, keep in picks.items():
        print(f"  {name:34s} {keep}  {held_out(keep):.3f}", flush=True)

    seconds = 0.0
    for r in greedy_layers(search, layers, KEEP):
        print(f"  greedy: {r.keep}  calibration KL {r.kl:.3f}", flush=True)
        keep, seconds = r.keep, seconds + r.seconds
    print(
        f"  greedy search ({args.calibration} records, {seconds:.0f} s) {keep}  {held_out(keep):.3f}"
    )


if __name__ == "__main__":
    main()
