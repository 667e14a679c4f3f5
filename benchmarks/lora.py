"""LoRA-KD against full KD at equal steps, on the demo pair (SmolLM2-135M-Instruct → 6 of its
layers): held-out quality, trainable parameters, step time and peak memory.

    python benchmarks/lora.py                       # 40k tokens each, r=16 on every projection
    python benchmarks/lora.py --tokens 80000 --rank 8

Each run is its own `potstill train recipes/lora_token_level.yaml` process; its peak resident
memory is measured over the training steps (teacher + student + gradients + optimizer state +
activations), from the first logged step on.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _pair import cpu_name

# The child resets the kernel's peak-RSS mark (VmHWM) at the first logged training step and reads
# it at each later one: the peak of the training steps themselves, not of loading the models (a
# full 30-layer copy is loaded to prune) or of the final held-out evaluation.
CHILD = """
import re, sys
from pathlib import Path
import potstill.train as t
peak = []
log = t.MetricsLog.log
def watch(self, row):
    if "loss" in row:
        if not peak:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        peak.append(int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)))
    log(self, row)
t.MetricsLog.log = watch
from potstill.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KIB", max(peak))
sys.exit(rc)
"""


def run(name: str, overrides: list[str], out: Path) -> dict[str, float]:
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run, not a resumed one
    cmd = [sys.executable, "-c", CHILD, "train", "recipes/lora_token_level.yaml", *overrides,
           f"train.output_dir={out / name}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    text = done.stdout
    held = dict(re.findall(r"(\w+)=([-\d.e]+)", text.split("held-out:")[1].splitlines()[0]))
    trainable = re.search(r"LoRA r=\d+: ([\d.]+)M trainable", text)
    total = float(re.search(r"student: ([\d.]+)M parameters", text).group(1))
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]  # tokens_per_s: the run's average so far
    return {
        "teacher_kl": float(held["teacher_kl"]),
        "top1_agreement": float(held["top1_agreement"]),
        "trainable_M": float(trainable.group(1)) if trainable else total,
        "tokens_per_s": last["tokens_per_s"],
        "step_s": last["tokens"] / last["step"] / last["tokens_per_s"],
        "peak_rss_GiB": int(re.search(r"PEAK_RSS_KIB (\d+)", text).group(1)) / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=40_000, help="training tokens per run")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=5e-4, help="the demo's")
    p.add_argument("--out", default="runs/bench_lora")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}")
    common = [f"train.max_tokens={args.tokens}", "train.eval_every=0", "train.log_every=1"]
    lora = [f"student.lora.r={args.rank}", f"student.lora.alpha={2 * args.rank}"]
    results = {
        f"LoRA r={args.rank}": run(
            "lora", [*common, *lora, f"train.lr={args.lora_lr}"], Path(args.out)
        ),
        "full KD": run(
            "full", [*common, "student.lora.r=0", f"train.lr={args.full_lr}"], Path(args.out)
        ),
    }
    keys = ["teacher_kl", "top1_agreement", "trainable_M", "step_s", "tokens_per_s", "peak_rss_GiB"]
    print("\n| student | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    Path(args.out, "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
