"""How general a copy of the teacher the demo's students are: the demo's recipe trained on
`bundled:general` (prose, docs, code and maths in equal shares), KD against the CE baseline at
the same budget, then each student's teacher KL on held-out text of every kind and the share of
the pruned start's KL it removes (`potstill report --general`).

    python benchmarks/general_copy.py                                    # the demo's settings
    python benchmarks/general_copy.py train.batch_size=2 train.lr=1e-3   # a sweep point

Every run is a real `potstill train`; the figures are the report card's (its "general" table and
the share of the start's KL each student removes), printed as it ends.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from _pair import cpu_name

from potstill.demo import DEMO_OVERRIDES
from potstill.recipe import load_recipe


def potstill(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "potstill.cli", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/general_copy", help="where the runs and card go")
    p.add_argument("--records", type=int, default=12, help="held-out records of each kind")
    p.add_argument("overrides", nargs="*", help="key=value, on top of the demo's recipe")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(
        None,
        [*DEMO_OVERRIDES, "data.train=bundled:general", "train.eval_every=0", *args.overrides],
    )
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    potstill("train", str(path), f"train.output_dir={out / 'kd'}")
    potstill("train", str(path), "method=sft", f"train.output_dir={out / 'ce'}")
    potstill(
        "report", f"KD={out / 'kd'}", f"CE={out / 'ce'}", "--general", str(args.records),
        "--no-generation", "--no-speed", "-o", str(out / "report.html"),
    )  # fmt: skip
    print(f"\n{cpu_name()}; {' '.join(args.overrides) or 'the demo settings'}")  # the card is above


if __name__ == "__main__":
    main()
