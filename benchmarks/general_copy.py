"""How general a copy of the teacher the demo's students are: the demo's recipe trained on
`bundled:general` (prose, docs, code and maths in equal shares), KD against the CE baseline at
the same budget, then each student's teacher KL on held-out text of every kind and the share of
the pruned start's KL it removes (`potstill report --general`).

    python benchmarks/general_copy.py                                    # the demo's settings
    python benchmarks/general_copy.py train.batch_size=2 train.lr=1e-3   # a sweep point

Every run is a real `potstill train`, and the figures come from `potstill report`'s JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from _pair import cpu_name

from potstill.demo import DEMO_OVERRIDES
from potstill.metrics import GENERAL
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
    card = json.loads((out / "report.json").read_text())
    print(f"\n{cpu_name()}; {' '.join(args.overrides) or 'the demo settings'}")
    print(
        f"teacher KL on {args.records} held-out records of each kind (share of the start's removed)"
    )
    rows = card["rows"]  # name -> metrics: teacher, before training, KD, CE
    start = rows["before training"]
    print(f"{'model':16s}" + "".join(f"{k:>18s}" for k in GENERAL))
    for name, row in rows.items():
        cells = []
        for key in GENERAL:
            kl = row.get(key)
            if kl is None:
                cells.append("-")
                continue
            share = (
                "" if name in ("teacher", "before training") else f" ({1 - kl / start[key]:.0%})"
            )
            cells.append(f"{kl:.3f}{share}")
        print(f"{name:16s}" + "".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
