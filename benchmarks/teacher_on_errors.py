"""What a teacher says where the student's own sample goes wrong: the teacher's next-token choice
at the wrong results of the student's wrong answers to two-number sums (the CoT recipe's
`basic_arithmetic` task) — on-policy distillation's training signal exactly there.

For each wrong sample (a `potstill generate … generate.keep=all` file of the student's greedy
answers, with the task's verdicts), the numbers in its text that are neither operand nor the right
answer are its wrong results. At the first one, and wherever the sample repeats it later, the
teacher reads the student's text up to that number and is asked for its first token: is the
teacher's top choice the right answer's first token, the student's wrong one, or another? Places
where both start with the same token are skipped (the first token does not tell them apart).

    potstill generate recipes/cot_distill.yaml generate.prompts_split=eval generate.max_prompts=200 \\
        generate.n=1 generate.temperature=0 generate.keep=all \\
        generate.model=bundled:smollm2-135m-instruct generate.output=runs/start.jsonl
    python benchmarks/teacher_on_errors.py TEACHER_DIR runs/start.jsonl \\
        --teacher-samples runs/teacher.jsonl    # the teacher's own answers, generated the same way

docs/methods/on_policy.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch
from _pair import cpu_name

from potstill.generate import read_jsonl
from potstill.models import load_model, load_tokenizer

NUMBER = re.compile(r"\d+")


def places(record: dict) -> list[tuple[str, int]]:
    """(kind, character offset in the completion) of the sample's wrong results: kind "first"
    for the first, "repeat" where the same value comes again."""
    operands = NUMBER.findall(record["prompt"][-1]["content"])[:2]
    text = record["completion"][0]["content"]
    out, first = [], None
    for m in NUMBER.finditer(text):
        value = m.group()
        if value in operands or value == record["answer"]:
            continue
        if first is None:
            first = value
            out.append(("first", m.start()))
        elif value == first:
            out.append(("repeat", m.start()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="the teacher: a model folder, .gguf file or bundled:NAME")
    p.add_argument("samples", help="the student's answers: a generate output with verdicts")
    p.add_argument(
        "--teacher-samples",
        help="the teacher's own answers to the same prompts (a generate output): also count how "
        "many of the student's wrong problems the teacher gets right by itself",
    )
    args = p.parse_args()
    tokenizer = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher).eval()
    records, _ = read_jsonl(Path(args.samples))
    wrong = [r for r in records if r.get("correct") is False]
    choices = {"first": Counter(), "repeat": Counter()}
    p_right = {"first": [], "repeat": []}
    for r in wrong:
        prefix = tokenizer.apply_chat_template(
            r["prompt"], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(
            prefix + r["completion"][0]["content"],
            return_offsets_mapping=True,
            add_special_tokens=False,
        )
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        with torch.no_grad():
            probs = teacher(torch.tensor([ids])).logits[0].float().softmax(-1)  # (T, V)
        right_id = tokenizer(r["answer"], add_special_tokens=False)["input_ids"][0]
        for kind, offset in places(r):
            at = len(prefix) + offset
            i = next(k for k, (s, e) in enumerate(spans) if s <= at < e)  # the number's 1st token
            if ids[i] == right_id:
                continue
            top = int(probs[i - 1].argmax())  # what the teacher would write there
            choices[kind][
                "right" if top == right_id else "student" if top == ids[i] else "other"
            ] += 1
            p_right[kind].append(float(probs[i - 1, right_id]))
    print(f"{cpu_name()}; {len(wrong)} wrong samples of {len(records)}; teacher {args.teacher}")
    print(
        "| place | n | teacher's top choice: right | the student's wrong | other | mean P(right) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind, c in choices.items():
        n = sum(c.values())
        mean = sum(p_right[kind]) / max(1, n)
        print(f"| {kind} | {n} | {c['right']} | {c['student']} | {c['other']} | {mean:.3f} |")
    if args.teacher_samples:
        own = {
            json.dumps(t["prompt"]): t["correct"] for t in read_jsonl(Path(args.teacher_samples))[0]
        }
        solved = sum(bool(own.get(json.dumps(r["prompt"]))) for r in wrong)
        print(f"the teacher answers {solved} of the {len(wrong)} right by itself")


if __name__ == "__main__":
    main()
