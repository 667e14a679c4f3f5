"""The lmeval extra: a custom lm-evaluation-harness task from a local JSONL, no download."""

from __future__ import annotations

import json

import pytest
import torch

TASK = """task: potstill_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def sums_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lmeval extra is not installed (`make` installs it)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = [
        {"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0}
        for a in range(1, 5)
        for b in range(1, 4)
    ]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "potstill_sums.yaml").write_text(TASK.format(data=tmp_path / "sums.jsonl"))
    return tasks, rows


def test_a_local_harness_task_scores_as_the_log_likelihoods_say(sums_task, tiny_chat_lm):
    """The harness's multiple-choice accuracy equals our own count of the records whose right
    choice has the highest summed log-likelihood after the question (and a space)."""
    from potstill.errors import RecipeError
    from potstill.lmeval import harness

    tasks, rows = sums_task
    model, tokenizer = tiny_chat_lm
    got = harness(model, tokenizer, ["potstill_sums"], include_path=tasks)
    assert set(got) == {"potstill_sums"}

    def loglik(context: str, continuation: str) -> float:
        ids = tokenizer(context + continuation)["input_ids"]
        n = len(tokenizer(context)["input_ids"])
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
        return sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))

    right = [
        max(range(3), key=lambda i: loglik(r["question"], " " + r["choices"][i])) == r["label"]
        for r in rows
    ]
    assert got["potstill_sums"]["acc"] == pytest.approx(sum(right) / len(rows))
    assert harness(model, tokenizer, ["potstill_sums"], include_path=tasks, limit=4)[
        "potstill_sums"
    ]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(RecipeError, match="no task potstill_nope"):
        harness(model, tokenizer, ["potstill_nope"], include_path=tasks)
