"""The metric registry and `potstill report`: metrics on crafted inputs, the card of two tiny
runs (files, content, determinism), and the page in a real browser."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from potstill.metrics import (
    COST,
    METRICS,
    NEEDS,
    QUALITY,
    Context,
    Settings,
    markdown_table,
    measure,
)


def test_every_metric_declares_a_known_measurement_and_direction():
    from potstill.metrics import MEASUREMENTS

    names = {m.name for m in MEASUREMENTS}
    for m in METRICS.values():
        assert m.measurement in names and m.better in ("lower", "higher", None)
    for m in MEASUREMENTS:
        assert set(m.needs) <= set(NEEDS)
    assert set(QUALITY).isdisjoint(COST)


def test_a_perfect_copy_of_the_teacher_scores_zero_kl_and_full_agreement(tiny_chat_lm):
    from potstill.data import tokenize_records
    from potstill.train import fixed_batches

    teacher, tokenizer = tiny_chat_lm
    records = [
        {"prompt": f"{a}+{a}=", "completion": f" {2 * a}", "answer": str(2 * a)} for a in range(8)
    ]
    examples, _ = tokenize_records(records, tokenizer, max_length=64, packing=False)
    c = Context(
        model=copy.deepcopy(teacher),
        tokenizer=tokenizer,
        settings=Settings(prompts=4, max_new_tokens=6, speed=False),
        batches=fixed_batches(examples, batch_size=4, pad_id=tokenizer.pad_token_id),
        records=records,
        teacher=teacher,
    )
    m = measure(c)
    assert m["teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["teacher_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    assert m["own_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    # the random model answers none of the sums; every answer was checked
    assert m["task_prompts"] == 4 and 0.0 <= m["task_accuracy_greedy"] <= 1.0
    assert "decode_tokens_per_s" not in m  # speed was not asked for
    assert "train_tokens" not in m and "model_mb" not in m  # no run log, no saved model
    # a student that differs is measurably away from the teacher
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn_like(other.lm_head.weight))
    far = measure(Context(**{**c.__dict__, "model": other}))
    assert far["teacher_kl"] > 0.01 and far["top1_agreement"] < 1.0


def test_a_collapsed_students_samples_score_low_diversity():
    from potstill.evaluate import score_own_samples

    model = torch.nn.Linear(1, 1)  # never called without a teacher
    collapsed = [[7, 8] * 30 for _ in range(4)]
    varied = [list(range(i, i + 60)) for i in range(0, 400, 100)]
    low = score_own_samples(model, None, [[1]] * 4, collapsed, pad_token_id=0)
    high = score_own_samples(model, None, [[1]] * 4, varied, pad_token_id=0)
    assert low["own_distinct_2"] < 0.02 and low["own_repetition"] > 0.9
    assert high["own_distinct_2"] == 1.0 and high["own_repetition"] == 0.0
    assert "own_reverse_kl" not in low  # no teacher, no KL
    assert low["own_sample_tokens"] == 60


def test_task_accuracy_counts_verified_answers():
    from potstill.metrics import task_accuracy

    records = [{"answer": "4"}, {"answer": "4"}, {"answer": "2"}, {"text": "no answer to check"}]
    texts = ["2+2=4\nAnswer: 4", "Answer: 5", "I think it is 2", "anything"]
    assert task_accuracy(records, texts) == (2 / 3, 3)
    assert math.isnan(task_accuracy([{"text": "x"}], ["y"])[0])
    # a reasoning-gym record is checked by its task's own scorer
    rg = {"answer": "12", "task": "basic_arithmetic", "metadata": {}}
    assert task_accuracy([rg, rg], ["Answer: 12", "Answer: 13"]) == (0.5, 2)


def test_tables_show_only_measured_columns_with_directions():
    rows = {"a": {"teacher_kl": 1.5, "top1_agreement": 0.5}, "b": {"teacher_kl": math.nan}}
    lines = markdown_table(rows, QUALITY)
    assert lines[0] == "| model | teacher KL ↓ | top-1 agreement ↑ |"
    assert lines[3] == "| b | — | — |"
    assert markdown_table({"a": {}}, QUALITY) == []


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_pair_dirs):
    """Two finished tiny runs from one student init: token-level KD and plain CE."""
    from potstill.cli import main

    root = tmp_path_factory.mktemp("report")
    rows = [
        {"messages": [{"role": "user", "content": f"{a}+{b}?"},
                      {"role": "assistant", "content": f"{a}+{b}={a + b}\nAnswer: {a + b}"}],
         "answer": str(a + b)}
        for a in range(10) for b in range(4)
    ]  # fmt: skip
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = (
        f"teacher: {{model: {tiny_pair_dirs / 'teacher'}}}\n"
        f"student: {{model: {tiny_pair_dirs / 'student'}, init: pretrained}}\n"
        f"data: {{train: {root / 'data.jsonl'}, max_eval_records: 8}}\n"
        "train: {precision: fp32, max_steps: 4, batch_size: 4, eval_every: 2, lr: 1e-3}\n"
    )
    for method in ("token_level", "sft"):
        (root / f"{method}.yaml").write_text(f"method: {method}\n" + base)
        out = root / method
        assert main(["train", str(root / f"{method}.yaml"), f"train.output_dir={out}"]) == 0
    return root


def test_the_report_card_of_two_runs(two_runs, capsys):
    from potstill.cli import main

    out = two_runs / "card" / "report.html"
    argv = ["report", f"KD={two_runs / 'token_level'}", f"CE={two_runs / 'sft'}", "-o", str(out)]
    assert main([*argv, "--prompts", "4", "--max-new-tokens", "8"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert list(rows) == ["teacher", "before training", "KD", "CE"]
    for name in ("before training", "KD", "CE"):
        for key in ("teacher_kl", "teacher_reverse_kl", "top1_agreement", "perplexity",
                    "task_accuracy_greedy", "task_accuracy_sampled", "own_reverse_kl",
                    "own_distinct_2", "parameters", "decode_tokens_per_s",
                    "decode_tokens_per_s_batched"):  # fmt: skip
            assert key in rows[name], (name, key)
    for name in ("KD", "CE"):
        assert rows[name]["train_tokens"] > 0 and rows[name]["train_seconds"] > 0
        assert rows[name]["model_mb"] > 0
    assert rows["teacher"]["teacher_kl"] == 0 and "task_accuracy_greedy" in rows["teacher"]
    # verdicts: each run against the start, then CE against KD, computed from the figures
    v = report["verdicts"]
    assert len(v) == 3 and v[0].startswith("KD is ") and v[2].startswith("CE is ")
    assert "than KD on" in v[2] or "level on" in v[2]
    assert report["environment"]["torch"] == torch.__version__
    # the page: self-contained, both plots inlined, nothing to fetch
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r"""(?:src|href)=["'](?!data:)""", page)
    assert "default-src 'none'" in page and "potstill train" in page
    md = out.with_suffix(".md").read_text()
    assert (
        "(report_files/loss_terms.png)" in md
        and (out.parent / "report_files" / "held_out.png").is_file()
    )
    assert "| KD |" in md and "## Verdicts" in md
    assert "| teacher |" in capsys.readouterr().out  # the summary printed
    # the same inputs give the same numbers (speed is measured once and kept)
    first = out.with_suffix(".json").read_text()
    assert main([*argv, "--prompts", "4", "--max-new-tokens", "8"]) == 0
    assert out.with_suffix(".json").read_text() == first


def test_the_report_card_measures_a_general_copy_on_other_kinds_of_text(two_runs, tmp_path):
    from potstill.cli import main
    from potstill.metrics import GENERAL

    out = tmp_path / "card.html"
    argv = ["report", f"KD={two_runs / 'token_level'}", "-o", str(out), "--no-generation",
            "--no-speed", "--general", "2"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert GENERAL == ("kl_prose", "kl_docs", "kl_code", "kl_maths")
    assert all(rows["teacher"][k] == 0.0 for k in GENERAL)  # the teacher against itself
    for name in ("before training", "KD"):
        assert all(math.isfinite(rows[name][k]) and rows[name][k] > 0 for k in GENERAL), name
    assert report["command"].endswith("--general 2")
    md = out.with_suffix(".md").read_text()
    assert "## A general copy? Text of other kinds" in md and "| prose KL ↓ |" in md
    line = next(x for x in md.splitlines() if x.startswith("- KD removes "))
    # the share removed is computed from the two rows' figures
    share = 1 - rows["KD"]["kl_prose"] / rows["before training"]["kl_prose"]
    assert f"{share:.0%} on held-out prose" in line and line.endswith("before training had.")


def test_general_text_holds_out_whole_modules_and_plays_in_equal_shares():
    from potstill.data.bundled import GENERAL_KINDS, general_records, python_records

    held = general_records("eval", chunk_chars=800, limit=12)
    assert [r["kind"] for r in held] == list(GENERAL_KINDS) * 3
    train = general_records("train", chunk_chars=800, limit=None)
    assert {k: sum(r["kind"] == k for r in train) for k in GENERAL_KINDS} == dict.fromkeys(
        GENERAL_KINDS, len(train) // 4
    )
    for kind in ("code", "docs"):
        a, b = python_records("train", kind=kind), python_records("eval", kind=kind)
        assert len(b) > 20 and len(a) > 5 * len(b)
        assert not {r["module"] for r in a} & {r["module"] for r in b}
        assert all(200 <= len(r["text"]) <= 1500 for r in b)
    assert "def " in " ".join(r["text"] for r in python_records("eval", kind="code")[:20])
    docs = " ".join(r["text"] for r in python_records("eval", kind="docs")[:20])
    assert "def " not in docs and len(docs.split()) > 500  # English about code, not code

    def key(r):  # maths records are chats, the others text
        return r.get("text") or json.dumps(r["messages"])

    assert not {key(r) for r in train} & {key(r) for r in held}


def test_report_refuses_what_is_not_a_finished_run(tmp_path):
    from potstill.errors import RecipeError
    from potstill.report import parse_runs

    with pytest.raises(RecipeError, match="not a run directory"):
        parse_runs([str(tmp_path)])
    (tmp_path / "recipe.yaml").write_text("method: sft\nteacher: {model: x}\n")
    with pytest.raises(RecipeError, match="has no saved model"):
        parse_runs([str(tmp_path)])


def _chromium() -> str | None:
    import shutil

    return next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )


# After load: how many images there are, how many decoded, and how many resources were fetched.
_PROBE = """<script>
addEventListener("load", () => {
  const imgs = [...document.images];
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
    fetched: performance.getEntriesByType("resource").map((r) => r.name),
  });
  document.body.append(probe);
});
</script>"""


def test_the_page_renders_in_a_real_browser_with_every_plot_and_no_fetch(two_runs, tmp_path):
    import subprocess

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH: `make test` installs it with apt where it runs as root")
    from potstill.report import build_report

    out = tmp_path / "report.html"
    build_report(
        [f"KD={two_runs / 'token_level'}", f"CE={two_runs / 'sft'}"],
        out,
        Settings(prompts=2, max_new_tokens=4, speed=False),
    )
    page = out.read_text()
    # the page's own policy forbids scripts; the probe copy allows inline ones and nothing more
    probed = tmp_path / "probed.html"
    probed.write_text(
        page.replace(
            "default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';"
        ).replace("</body>", _PROBE + "</body>")
    )
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1200,1600", "--virtual-time-budget=3000"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    found = json.loads(
        re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1).replace("&quot;", '"')
    )
    assert found == {"images": 2, "loaded": 2, "fetched": []}
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("L").getextrema()
        assert colours[1] - colours[0] > 100  # text and plots drawn, not a blank page


def test_the_report_page_documents_every_metric_and_measurement():
    from pathlib import Path

    from potstill.metrics import MEASUREMENTS

    text = (Path(__file__).resolve().parents[1] / "docs" / "report.md").read_text()
    for key in METRICS:
        assert f"`{key}`" in text, key
    for m in MEASUREMENTS:
        assert f"| {m.name} |" in text, m.name


def test_the_demo_ends_with_the_report_card_of_its_runs(tmp_path, smollm2_dir, monkeypatch):
    """The demo on the bundled pair at a tiny budget: both students trained, then the card."""
    from potstill import demo

    monkeypatch.setattr(
        demo, "DEMO_REPORT", Settings(prompts=2, max_new_tokens=12, speed=False, general=1)
    )
    overrides = [f"teacher.model={smollm2_dir}", "train.max_tokens=600", "data.max_eval_records=4",
                 "data.max_train_records=24", "train.eval_every=0", "train.save_every=0",
                 "train.precision=fp32"]  # fmt: skip
    metrics = demo.run_demo(tmp_path, overrides)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["rows"]) == ["teacher", "before training", "KD", "CE baseline"]
    # the pruned start is far from the teacher; the demo's figures are the card's
    assert report["rows"]["before training"]["teacher_kl"] > 3
    assert metrics["kd"]["teacher_kl"] == report["rows"]["KD"]["teacher_kl"]
    assert metrics["student_init"]["parameters"] < metrics["teacher"]["parameters"]
    assert "task_accuracy_greedy" in report["rows"]["teacher"]  # gsm_symbolic carries answers
    assert report["verdicts"][0].startswith("KD is ")
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()


def test_the_report_card_runs_harness_tasks(two_runs, tmp_path, tiny_chat_lm, monkeypatch):
    from test_lmeval import TASK

    from potstill.cli import main

    pytest.importorskip("lm_eval", reason="the lmeval extra is not installed (`make` installs it)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = [{"question": f"{a}+1=", "choices": [str(a + 1), str(a)], "label": 0} for a in range(6)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(TASK.format(data=tmp_path / "sums.jsonl"))
    out = tmp_path / "card.html"
    argv = ["report", str(two_runs / "token_level"), "-o", str(out), "--no-generation",
            "--no-speed", "--lm-eval", "potstill_sums", "--lm-eval-include", str(tmp_path / "tasks")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for row in report["rows"].values():
        assert 0 <= row["harness"]["potstill_sums"]["acc"] <= 1
        assert "task_accuracy_greedy" not in row and "decode_tokens_per_s" not in row
    assert "## lm-evaluation-harness" in out.with_suffix(".md").read_text()
    assert "--lm-eval potstill_sums" in report["command"]


def test_size_counts_the_saved_model_and_an_exported_gguf(tmp_path, tiny_chat_lm):
    from potstill.metrics import measure_size

    model, tokenizer = tiny_chat_lm
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "student-q8_0.gguf").write_bytes(b"\0" * 2_000_000)
    c = Context(model=model, tokenizer=tokenizer, settings=Settings(), model_dir=tmp_path / "model",
                run_dir=tmp_path)  # fmt: skip
    size = measure_size(c)
    saved = sum(f.stat().st_size for f in (tmp_path / "model").iterdir())
    assert size["parameters"] == sum(p.numel() for p in model.parameters())
    assert size["model_mb"] == saved / 1e6 and size["gguf_mb"] == 2.0
    assert "gguf_mb" not in measure_size(
        Context(model=model, tokenizer=tokenizer, settings=Settings())
    )
