"""An embedding student against its teacher: bundled all-MiniLM-L6-v2 (6 layers) distilled into
itself with 3 layers (``recipes/embedding.yaml``), in one process.

Measures, on held-out sentences, the teacher, the pruned student before distillation and the
distilled student:

* structure kept: recall@10 of the teacher's own ten nearest neighbours and the Spearman
  correlation of all pairwise cosine similarities, on held-out gsm_symbolic questions;
* a labelled retrieval task built offline: 40 questions from each of 8 reasoning-gym task
  families; precision@10 of same-family neighbours;
* encoding speed (sentences/s at batch 32, the same sentences) and parameters.

    python benchmarks/embedding.py                 # recipes/embedding.yaml as it is
    python benchmarks/embedding.py --steps 600
    python benchmarks/embedding.py --attention-weight 1     # plus Q/K/V relations
"""

from __future__ import annotations

import argparse
import time

import torch
from _pair import cpu_name, train_one  # the demo helpers (benchmarks/_pair.py)

FAMILIES = ["basic_arithmetic", "gsm_symbolic", "letter_counting", "spell_backward",
            "word_sorting", "base_conversion", "caesar_cipher", "number_sorting"]  # fmt: skip


def batches(tokenizer, sentences: list[str], size: int = 32) -> list[dict]:
    return [
        dict(tokenizer(sentences[i : i + size], padding=True, truncation=True, max_length=128,
                       return_tensors="pt"))
        for i in range(0, len(sentences), size)
    ]  # fmt: skip


@torch.no_grad()
def embed(method, model, batched) -> torch.Tensor:
    return torch.cat([method.embed(model, b) for b in batched])


def precision_at_10(emb: torch.Tensor, labels: torch.Tensor) -> float:
    sim = torch.nn.functional.normalize(emb, dim=-1)
    sim = (sim @ sim.T).fill_diagonal_(float("-inf"))
    near = sim.topk(10, -1).indices  # (n, 10)
    return float((labels[near] == labels[:, None]).float().mean())


def speed(method, model, batched, repeats: int = 3) -> float:
    embed(method, model, batched)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        embed(method, model, batched)
    return repeats * sum(b["input_ids"].shape[0] for b in batched) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (recipe's)")
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=0.0,
        help="embedding.attention_weight: add MiniLM-v2 Q/K/V relations",
    )
    args = parser.parse_args()
    from potstill.data import load_records
    from potstill.methods import build_method
    from potstill.methods.embedding import sentence_of, similarity_report
    from potstill.models import count_parameters
    from potstill.prepare import load_models
    from potstill.recipe import load_recipe

    overrides = ["train.output_dir=runs/bench_embedding", "train.resume=false",
                 "train.save_every=0", "train.eval_every=0"]  # fmt: skip
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.attention_weight:
        overrides.append(f"embedding.attention_weight={args.attention_weight}")
    r = load_recipe("recipes/embedding.yaml", overrides)
    before = load_models(r)
    method = build_method(r, vocab_size=before.vocab_size)
    method.bind(before.tokenizer, before.teacher_tokenizer)
    tok = before.tokenizer
    held = [
        sentence_of(x) for x in load_records("bundled:rg/gsm_symbolic", split="test", limit=300)
    ]
    family_sentences, family_labels = [], []
    for i, task in enumerate(FAMILIES):
        rows = load_records(f"bundled:rg/{task}", split="test", limit=40)
        family_sentences += [sentence_of(x) for x in rows]
        family_labels += [i] * len(rows)
    labels = torch.tensor(family_labels)
    held_b, fam_b = batches(tok, held), batches(tok, family_sentences)

    t0 = time.perf_counter()
    models, _, result = train_one(r, None)
    train_seconds = time.perf_counter() - t0
    teacher = models.teacher.eval()
    rows = []
    for name, model in [("teacher (6 layers)", teacher),
                        ("student before distillation (3 layers)", before.student.eval()),
                        ("student distilled (3 layers)", models.student.eval())]:  # fmt: skip
        report = similarity_report(embed(method, model, held_b), embed(method, teacher, held_b))
        rows.append((name, count_parameters(model), report,
                     precision_at_10(embed(method, model, fam_b), labels),
                     speed(method, model, fam_b)))  # fmt: skip
    print(f"\nCPU: {cpu_name()}; torch {torch.__version__}; fp32")
    print(f"distillation: {result.steps} steps of {r.train.batch_size} gsm_symbolic questions, "
          f"{train_seconds:.0f} s; held-out: {len(held)} gsm_symbolic questions, "
          f"{len(family_sentences)} questions of {len(FAMILIES)} task families\n")  # fmt: skip
    print(
        "| model | parameters | cosine to teacher | recall@10 of teacher's neighbours | "
        "Spearman | family precision@10 | sentences/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params, rep, prec, sps in rows:
        print(
            f"| {name} | {params / 1e6:.1f}M | {rep['cosine_to_teacher']:.4f} | "
            f"{rep['recall_at_10']:.3f} | {rep['spearman']:.4f} | {prec:.3f} | {sps:.0f} |"
        )
    print(
        f"\nspeed: student {rows[2][4] / rows[0][4]:.2f}× the teacher; family precision@10 "
        f"kept: {100 * rows[2][3] / rows[0][3]:.1f}% of the teacher's"
    )


if __name__ == "__main__":
    main()
