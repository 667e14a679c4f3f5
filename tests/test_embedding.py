"""Embedding-model students: the sentence each record stands for, the similarity report, and a
real run on the bundled all-MiniLM-L6-v2 whose saved student loads in sentence-transformers with
the same embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.errors import DataError
from potstill.methods.embedding import sentence_of, similarity_report


def test_each_record_kind_gives_its_sentence():
    assert sentence_of({"text": "a b"}) == "a b"
    assert sentence_of({"prompt": "p", "completion": "c"}) == "p"
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q?"}]}
    assert sentence_of(chat) == "q?"
    with pytest.raises(DataError, match="no sentence"):
        sentence_of({"answer": 3})


def test_the_similarity_report_is_perfect_for_the_teacher_and_worse_for_noise():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(40, 16, generator=g)
    same = similarity_report(3 * teacher, teacher)
    assert same["recall_at_10"] == 1.0 and same["spearman"] > 0.9999
    assert abs(same["cosine_to_teacher"] - 1) < 1e-5
    noisy = similarity_report(teacher + 2 * torch.randn(40, 16, generator=g), teacher)
    assert noisy["recall_at_10"] < 0.8 and 0 < noisy["spearman"] < 0.95
    other_width = similarity_report(torch.randn(40, 8, generator=g), teacher)
    assert "cosine_to_teacher" not in other_width


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    from potstill.bundled_models import resolve_bundled_model
    from potstill.errors import ModelLoadError

    try:
        return resolve_bundled_model("all-minilm-l6-v2")
    except ModelLoadError as err:
        pytest.skip(str(err))


def test_a_pruned_minilm_student_trains_and_loads_in_sentence_transformers(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    from potstill.cli import main
    from potstill.methods.embedding import Embedding
    from potstill.models import load_model

    out = tmp_path / "run"
    args = [
        "train", "recipes/embedding.yaml", "train.max_steps=3", "train.batch_size=8",
        "data.max_train_records=24", "data.max_eval_records=24", "train.eval_every=0",
        "train.save_every=0", "train.log_every=1", f"train.output_dir={out}",
        "embedding.attention_weight=1.0",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["embedding"] > 0 and rows[0]["relation"] > 0 and rows[0]["attention"] > 0
    final = rows[-1]
    assert 0 < final["eval/recall_at_10"] <= 1 and -1 <= final["eval/spearman"] <= 1
    assert 0.5 < final["eval/cosine_to_teacher"] <= 1
    # the saved student is a sentence-transformers model with the teacher's pooling
    sentences = ["How many apples are left?", "A train leaves at 3 pm.", "x"]
    loaded = SentenceTransformer(str(out / "model"), device="cpu")
    assert len(loaded) == 3  # Transformer, Pooling, Normalize
    got = torch.tensor(loaded.encode(sentences))
    student = load_model(str(out / "model"), encoder=True).eval()
    method = Embedding(teacher_folder=str(minilm))
    batch = loaded.tokenize(sentences)
    with torch.no_grad():
        ours = method.embed(student, batch)
    torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-5)
    assert student.config.num_hidden_layers == 3


def test_an_embedding_student_from_a_config_is_refused(minilm, tmp_path, capsys):
    from potstill.cli import main

    args = ["train", "recipes/embedding.yaml", "student.init=config",
            f"train.output_dir={tmp_path}"]  # fmt: skip
    assert main(args) == 2
    assert "not from a config" in capsys.readouterr().err
