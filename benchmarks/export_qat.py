"""Ship the demo student: GGUF f16 / Q8_0 / Q4_0, post-training quantization against
quantization-aware KD, measured in PyTorch and in llama.cpp.

    python benchmarks/export_qat.py                      # student: runs/demo/kd/model (make demo)
    python benchmarks/export_qat.py --extra-tokens 20000 --lr 1e-4

For the demo's student and its held-out set (the demo recipe's 48 examples), each row reports the
held-out teacher KL and top-1 agreement (dense teacher, fp32), the GGUF file's size, and in
llama.cpp (the optional ``llama-cpp-python``): the same KL from the file's own log-probabilities,
the share of positions where its greedy next token equals the PyTorch student's (fake-quantized
for Q8_0/Q4_0), and its decoding speed (tokens/s, one token per step, 2 threads).

Rows: the student as trained (f16 file); post-training Q8_0 and Q4_0 (export only); QAT-KD Q8_0
and Q4_0 (``--extra-tokens`` more of forward-KL KD on the grid, from the student); and the control
that separates QAT from the extra training: the same extra KD without the grid, then quantized.
Recovery = (KL_ptq − KL_qat) / (KL_ptq − KL_full), against the student itself and against the
control (its PTQ and full-precision KL).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _pair import cpu_name, train_one

from potstill import students
from potstill.demo import DEMO_OVERRIDES
from potstill.export import export_gguf, load_llamacpp
from potstill.models import load_model
from potstill.prepare import load_data, load_models
from potstill.recipe import load_recipe


@torch.no_grad()
def target_logprobs(model, examples) -> list[torch.Tensor]:
    """Per example: log-probabilities (n_targets, V) fp32 at its supervised positions."""
    out = []
    model.eval()
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        rows = torch.tensor(ex.target_mask[1:]).nonzero().squeeze(1)  # row t predicts token t+1
        logits = model(ids).logits[0, rows].float()
        out.append(torch.log_softmax(logits, -1))
    return out


def compare(student: list, teacher: list) -> dict[str, float]:
    """Forward KL(teacher ‖ student) per token and top-1 agreement, over all targets."""
    kl = agree = n = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = torch.as_tensor(s), torch.as_tensor(t)
        kl += float((t.exp() * (t - s)).sum())
        agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        n += t.shape[0]
    return {"teacher_kl": kl / n, "top1_agreement": agree / n}


def llamacpp_rows(path: Path, examples) -> list[np.ndarray]:
    llama = load_llamacpp(path, n_ctx=1024, n_threads=2)
    out = []
    for ex in examples:
        llama.reset()
        llama.eval(ex.input_ids)
        rows = np.nonzero(np.asarray(ex.target_mask[1:]))[0]
        scores = np.asarray(llama.scores[: len(ex.input_ids)], dtype=np.float64)[rows]
        out.append(torch.log_softmax(torch.from_numpy(scores), -1).float())
    return out


def decode_speed(path: Path, ids: list[int], repeats: int = 3) -> float:
    """llama.cpp's decoding speed, tokens/s: ``ids`` fed one token per call after the first (the
    work of greedy generation, without its stopping early at an end token); the median of
    ``repeats``."""
    llama = load_llamacpp(path, n_ctx=1024, n_threads=2)
    speeds = []
    for _ in range(repeats):
        llama.reset()
        llama.eval(ids[:1])
        start = time.perf_counter()
        for token in ids[1:]:
            llama.eval([token])
        speeds.append((len(ids) - 1) / (time.perf_counter() - start))
    return sorted(speeds)[len(speeds) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", default="runs/demo/kd/model", help="the demo's KD student")
    p.add_argument("--extra-tokens", type=int, default=20_000, help="QAT-KD budget (tokens)")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT-KD peak learning rate")
    p.add_argument("--out", default="runs/bench_export")
    p.add_argument("--no-llamacpp", action="store_true", help="PyTorch figures only")
    p.add_argument("--formats", nargs="+", default=["q8_0", "q4_0"], choices=["q8_0", "q4_0"])
    args = p.parse_args()
    out = Path(args.out)
    if not Path(args.student, "config.json").is_file():
        raise SystemExit(f"no student at {args.student}: run `make demo` first")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    base = [*DEMO_OVERRIDES, "student.init=pretrained", f"student.model={args.student}"]
    base += [f"train.max_tokens={args.extra_tokens}", f"train.lr={args.lr}", "train.eval_every=0"]
    base += ["train.precision=fp32"]  # the grid exactly: bf16 matmuls would round its values
    recipe = load_recipe(None, [*base, f"train.output_dir={out / 'probe'}"])
    models = load_models(recipe)
    teacher = models.teacher
    examples = load_data(recipe, models.tokenizer).eval
    teacher_rows = target_logprobs(teacher, examples)
    speed_ids = max((ex.input_ids for ex in examples), key=len)[:129]  # 128 decode steps
    # the trained models: QAT-KD on each grid, and the extra KD without a grid (the control)
    trained = {}
    runs = [(f"qat_{fmt}", [f"student.qat.format={fmt}"]) for fmt in args.formats]
    for name, extra in [*runs, ("kd_more", [])]:
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh run, not a resumed one
        r = load_recipe(None, [*base, *extra, f"train.output_dir={out / name}"])
        _, _, result = train_one(r, teacher)
        trained[name] = result.model_dir
        print(f"{name}: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.0f} s")

    rows = {"student f16": (Path(args.student), "f16", None)}  # name -> (dir, GGUF type, grid)
    for fmt in args.formats:  # a grid: fake-quantize in PyTorch (QAT students are saved on it)
        rows[f"PTQ {fmt}"] = (Path(args.student), fmt, fmt)
        rows[f"QAT-KD {fmt}"] = (trained[f"qat_{fmt}"], fmt, None)
        rows[f"extra KD, then PTQ {fmt}"] = (trained["kd_more"], fmt, fmt)
    rows["extra KD (f16)"] = (trained["kd_more"], "f16", None)
    results = {}
    for name, (model_dir, gguf_type, grid) in rows.items():
        model = load_model(str(model_dir))
        if grid:
            students.add_qat(model, grid)
        torch_rows = target_logprobs(model, examples)
        row = compare(torch_rows, teacher_rows)
        path = out / "gguf" / f"{name.replace(' ', '_').replace(',', '')}.gguf"
        row["file_mib"] = export_gguf(model_dir, path, gguf_type).bytes / 2**20
        if not args.no_llamacpp:
            cpp_rows = llamacpp_rows(path, examples)
            cpp = compare(cpp_rows, teacher_rows)
            row["llamacpp_teacher_kl"] = cpp["teacher_kl"]
            same = torch.cat(
                [a.argmax(-1) == b.argmax(-1) for a, b in zip(cpp_rows, torch_rows, strict=True)]
            ).float()
            row["llamacpp_greedy_agreement"] = float(same.mean())
            # the same where the PyTorch student is not close to a tie (top-2 margin > 0.1 nats)
            clear = torch.cat(
                [(t.topk(2, -1).values.diff(dim=-1) < -0.1)[:, 0] for t in torch_rows]
            )
            row["llamacpp_greedy_agreement_clear"] = float(same[clear].mean())
            row["clear_share"] = float(clear.float().mean())
            row["llamacpp_tokens_per_s"] = decode_speed(path, speed_ids)
        results[name] = row
        print(name, json.dumps({k: round(v, 4) for k, v in row.items()}))

    for fmt in args.formats:
        qat = results[f"QAT-KD {fmt}"]["teacher_kl"]
        for label, full, ptq in (
            ("the student", "student f16", f"PTQ {fmt}"),
            ("the same extra KD without the grid", "extra KD (f16)", f"extra KD, then PTQ {fmt}"),
        ):
            full, ptq = results[full]["teacher_kl"], results[ptq]["teacher_kl"]
            print(
                f"{fmt} against {label}: PTQ loses {ptq - full:+.4f} nats of teacher KL, QAT-KD "
                f"ends {qat - full:+.4f} from it: recovers {(ptq - qat) / (ptq - full):.0%}"
            )
    keys = ["teacher_kl", "top1_agreement", "file_mib"]
    if not args.no_llamacpp:
        keys += ["llamacpp_teacher_kl", "llamacpp_greedy_agreement"]
        keys += ["llamacpp_greedy_agreement_clear", "llamacpp_tokens_per_s"]
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
