"""`potstill plan`'s memory and checkpoint estimates against real runs on the bundled models.

For each configuration: `potstill plan` (a fresh process), then a short `potstill train` of the
same recipe (one process, or two under `accelerate launch` with configs/accelerate/*.yaml); the
run's last metrics row holds `peak_memory_mb`, the resident-set peak of its largest process, and
its folder the checkpoint every run ends with (all processes' parts). Prints estimates,
measurements and errors. CPU only; runs one configuration at a time.

    .venv/bin/python benchmarks/plan_memory.py [--steps 3] [--out runs/bench_plan] [--only FSDP2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = [  # name, recipe, processes, engine, extra overrides
    ("token_level, 1 process", "recipes/token_level_forward_kl.yaml", 1, "ddp", []),
    ("token_level, 2 × DDP", "recipes/token_level_forward_kl.yaml", 2, "ddp", []),
    ("token_level, 2 × FSDP2", "recipes/token_level_forward_kl.yaml", 2, "fsdp2", []),
    ("token_level, 2 × ZeRO-2", "recipes/token_level_forward_kl.yaml", 2, "zero2", []),
    ("token_level, 2 × ZeRO-3", "recipes/token_level_forward_kl.yaml", 2, "zero3", []),
    ("sft baseline, 1 process", "recipes/sft_baseline.yaml", 1, "ddp", []),
    ("token_level batch 8, 1 process", "recipes/token_level_forward_kl.yaml", 1, "ddp",
     ["train.batch_size=8"]),
]  # fmt: skip


def planned(recipe: str, processes: int, engine: str, overrides: list[str]) -> tuple[float, float]:
    """The plan's (total per process, one checkpoint on disk), in bytes."""
    out = subprocess.run(
        [BIN / "potstill", "plan", recipe, "--processes", str(processes), "--engine", engine,
         *overrides],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}
    found = [
        re.search(pattern, out, re.M).groups()
        for pattern in (r"^\s+total\s+([\d.]+) (.iB)", r"a checkpoint of ≈ ([\d.]+) (.iB)")
    ]
    memory, disk = (float(value) * scale[unit] for value, unit in found)
    return memory, disk


def measured(recipe, processes, engine, overrides, out: Path, steps: int) -> tuple[float, int]:
    """(the run's peak resident memory, its checkpoint's bytes)."""
    shutil.rmtree(out, ignore_errors=True)
    train = [
        "potstill", "train", recipe, *overrides, f"train.output_dir={out}",
        f"train.max_steps={steps}", "train.eval_every=0", "data.max_eval_records=16",
    ]  # fmt: skip
    if processes > 1:
        config = ROOT / "configs" / "accelerate" / f"{engine}.yaml"
        command = [BIN / "accelerate", "launch", "--config_file", config, "--num_processes",
                   str(processes), "--no_python", *train]  # fmt: skip
    else:
        command = train
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    written = sum(f.stat().st_size for f in (out / "checkpoint").rglob("*") if f.is_file())
    return rows[-1]["peak_memory_mb"] * 2**20, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="runs/bench_plan")
    ap.add_argument("--only", help="run the configurations whose name contains this")
    args = ap.parse_args()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    )  # fmt: skip
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.steps} steps per run\n")
    print(f"{'':<34} {'memory per process':^27}   {'checkpoint on disk':^27}")
    print(f"{'configuration':<34} {'plan':>9} {'measured':>9} {'error':>7}   "
          f"{'plan':>9} {'written':>9} {'error':>7}")  # fmt: skip
    for i, (name, recipe, n, engine, overrides) in enumerate(CONFIGS):
        if args.only and args.only not in name:
            continue
        plan, disk = planned(recipe, n, engine, overrides)
        peak, written = measured(recipe, n, engine, overrides, ROOT / args.out / str(i), args.steps)
        print(
            f"{name:<34} {plan / 2**30:>7.2f} G {peak / 2**30:>7.2f} G {plan / peak - 1:>+7.1%}   "
            f"{disk / 2**30:>7.3f} G {written / 2**30:>7.3f} G {disk / written - 1:>+7.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
