"""Several processes on this CPU (gloo), launched as users launch them: ``accelerate launch`` with
the configs in configs/accelerate/. Every method trains under 2-process DDP and 2-process FSDP2
and ends where one process with ``grad_accum=2`` over the same global batches does; a 2-process
DDP run killed after its first checkpoint resumes to the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potstill.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
WORKER = Path(__file__).with_name("_launched.py")

TRAIN = (
    "train: {max_steps: 3, batch_size: 2, lr: 0.01, warmup_steps: 1, save_every: 2, "
    "log_every: 1, precision: fp32, eval_batches: 1}\n"
)
# run -> (method, what its recipe adds to the shared teacher / student / data)
RUNS = {
    "token_level": "",  # first: its processes' peak memory is its own (the plan test reads it)
    "sft": "",
    "token_level_cached": "teacher: {source: cache}\ncache: {top_k: 4}\n",
    "sequence_level": "",
    "on_policy": "on_policy: {max_new_tokens: 6, lmbda: 0.5}\n",
    "cross_tokenizer": "cross_tokenizer: {alignment: uld}\n",
    "feature": "feature: {hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0}\n",
    "draft": "draft: {eval_prompts: 2, eval_new_tokens: 4}\n",
    "embedding": "embedding: {relation_weight: 1.0}\n",
}


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_pair_dirs):
    """(folder, {method: recipe path}): tiny recipes of every method (and a teacher read from a cache) over the tiny pair (a
    narrower student for `feature`, so it has projectors; the bundled MiniLM for `embedding`)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(3)
    narrow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
        )
    )  # fmt: skip
    narrow.save_pretrained(root / "narrow")
    AutoTokenizer.from_pretrained(tiny_pair_dirs / "student").save_pretrained(root / "narrow")
    rows = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(10) for b in (3, 7)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    data = f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_length: 32}}\n"
    recipes = {}
    for run, extra in RUNS.items():
        method = run.removesuffix("_cached")
        if method == "embedding":
            models = "teacher: {model: bundled:all-minilm-l6-v2}\n"
            models += "student: {init: prune, keep_layers: [0, 5]}\n"
        else:
            student = root / "narrow" if method == "feature" else tiny_pair_dirs / "student"
            cache = f", cache: {root / 'cache'}" if run.endswith("_cached") else ""
            models = f"teacher: {{model: {tiny_pair_dirs / 'teacher'}{cache}}}\n"
            models += f"student: {{model: {student}, init: pretrained}}\n"
        path = root / f"{run}.yaml"
        extra = extra.replace("teacher: {source: cache}\n", "")  # given on the command line
        path.write_text(f"method: {method}\n{models}{data}{TRAIN}{extra}")
        recipes[run] = path
    # the teacher's top-k on disk, read by every process of the cached run
    assert main(["cache", str(recipes["token_level_cached"])]) == 0
    return root, recipes


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(config: str, jobs: list[list[str]], folder: Path, **popen) -> subprocess.Popen:
    """``accelerate launch --config_file configs/accelerate/CONFIG.yaml`` of the worker, 2 CPU
    processes, running ``jobs`` (argument lists of ``potstill``) in turn."""
    spec = folder / f"{config}-jobs.json"
    spec.write_text(json.dumps(jobs))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / f"{config}.yaml"), "--num_processes", "2", "--main_process_port", free_port(),
        str(WORKER), str(spec),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def saved(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved: the student's (any safetensors file under model/) and its
    method's modules beside it (e.g. projectors)."""
    files = [*sorted((run / "model").rglob("*.safetensors")), *sorted(run.glob("*.safetensors"))]
    assert files, f"nothing saved under {run}"
    return {f"{f.relative_to(run)}:{k}": v for f in files for k, v in load_file(f).items()}


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


def source(run: str) -> list[str]:
    return ["teacher.source=cache"] if run.endswith("_cached") else []


@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """{engine: {method: run folder}}: one process with grad_accum=2 (in this process), and two
    processes with grad_accum=1 under DDP and under FSDP2 (one launch each)."""
    _, recipes = table
    out = tmp_path_factory.mktemp("runs")
    folders = {e: {m: out / e / m for m in recipes} for e in ("one", "ddp", "fsdp2")}
    folders["said"] = {}
    for run, recipe in recipes.items():
        argv = ["train", str(recipe), "train.grad_accum=2", *source(run)]
        assert main([*argv, f"train.output_dir={folders['one'][run]}"]) == 0, run
    for engine in ("ddp", "fsdp2"):
        jobs = [
            ["train", str(recipes[m]), *source(m), f"train.output_dir={folders[engine][m]}"]
            for m in recipes
        ]
        said = finish(launch(engine, jobs, out))
        assert said.count("done: 3 steps") == len(recipes), said[-3000:]  # the first process only
        folders["said"][engine] = said
    return folders


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_train_as_one_with_the_same_global_batches(runs, engine, run):
    one, two = runs["one"][run], runs[engine][run]
    a, b = saved(one), saved(two)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("attention.self.key.bias"):  # BERT's key bias: its true gradient is 0 (a
            continue  # shift of every score in a row), so AdamW turns rounding noise into steps
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-4, msg=k)
    rows_a, rows_b = train_rows(one), train_rows(two)
    assert [r["tokens"] for r in rows_b] == [r["tokens"] for r in rows_a]  # all processes counted
    for ra, rb in zip(rows_a, rows_b, strict=True):  # the global loss and gradient, every step
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-7)


def test_each_run_says_its_engine_and_fsdp2_shards_the_teacher(runs):
    said, teachers = runs["said"], len(RUNS) - 3  # sft, sequence_level, the cache: none loaded
    assert (
        said["ddp"].count("engine: DDP (gloo), 2 processes; teacher: a copy per process")
        == teachers
    )
    assert said["fsdp2"].count("engine: FSDP2, 2 processes; teacher: sharded") == teachers
    assert said["fsdp2"].count("engine: FSDP2, 2 processes; teacher: none") == 3
    checkpoint = runs["fsdp2"]["token_level"] / "checkpoint"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # each process wrote its shard


STEPS = 30  # long enough that the kill lands well before the end


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_two_process_run_resumes_exactly(table, tmp_path):
    """SIGKILL to the whole launch (launcher and both workers) once the first checkpoint is in,
    then the same launch again: the final weights equal an uninterrupted 2-process run's."""
    _, recipes = table
    recipe = str(recipes["token_level"])
    steps = [f"train.max_steps={STEPS}", "train.save_every=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    finish(launch("ddp", [["train", recipe, *steps, f"train.output_dir={whole}"]], tmp_path))
    job = [["train", recipe, *steps, f"train.output_dir={cut}"]]
    proc = launch("ddp", job, tmp_path)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint" / "state.json").is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    launched = [proc.pid, *descendants(proc.pid)]  # the launcher, torchrun's agent, the workers
    assert len(launched) >= 3, launched
    for pid in launched:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not [p for p in launched if Path(f"/proc/{p}").exists() and not zombie(p)]
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert 2 <= state["step"] < STEPS, state
    said = finish(launch("ddp", job, tmp_path))
    assert f"resuming from {cut / 'checkpoint'} at step {state['step']}/{STEPS}" in said
    a, b = saved(whole), saved(cut)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def planned_total(recipe: Path, *args: str) -> float:
    """`potstill plan`'s total per process (MiB), from a fresh process as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "potstill.cli", "plan", str(recipe), "--tflops", "1", *args],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout  # fmt: skip
    value, unit = re.search(r"^\s+total\s+([\d.]+) (GiB|MiB)", out, re.M).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def peak_mb(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["peak_memory_mb"]


def test_the_plan_is_within_a_quarter_of_the_measured_peak(table, runs, tmp_path):
    """One process (its own subprocess, so that its peak is its own), and the 2-process DDP and
    FSDP2 runs of the same recipe."""
    _, recipes = table
    recipe = recipes["token_level"]
    alone = tmp_path / "alone"
    subprocess.run(
        [sys.executable, "-m", "potstill.cli", "train", str(recipe), f"train.output_dir={alone}"],
        capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    cases = {
        "one process": (planned_total(recipe), peak_mb(alone)),
        "DDP": (planned_total(recipe, "--processes", "2"), peak_mb(runs["ddp"]["token_level"])),
        "FSDP2": (
            planned_total(recipe, "--processes", "2", "--engine", "fsdp2"),
            peak_mb(runs["fsdp2"]["token_level"]),
        ),
    }
    errors = {k: plan / peak - 1 for k, (plan, peak) in cases.items()}
    assert all(abs(e) <= 0.25 for e in errors.values()), (errors, cases)


def test_what_is_not_supported_yet_is_refused_naming_the_launch_that_works(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from potstill import distributed
    from potstill.errors import RecipeError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match=r"DeepSpeed is not supported.*fsdp2.yaml"):
        distributed.make_accelerator()
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    with pytest.raises(RecipeError, match=r"student.lora and student.qat.*FSDP2.*ddp.yaml"):
        distributed.check_student(fsdp, transformed=True)
    distributed.check_student(fsdp, transformed=False)  # a plain student is fine


def test_a_plan_that_does_not_fit_names_the_knobs(table):
    from potstill.plan import make_plan
    from potstill.recipe import load_recipe

    _, recipes = table
    recipe = load_recipe(recipes["token_level"], [])
    fits = make_plan(recipe, processes=8, engine="fsdp2", device="gpu", memory_gb=80, tflops=400)
    assert fits.fits and "fits in 80.00 GiB" in fits.table() and not fits.knobs
    tight = make_plan(recipe, processes=1, device="gpu", memory_gb=0.5, tflops=400)
    said = tight.table()
    assert not tight.fits and "does NOT fit in 0.50 GiB" in said
    assert "FSDP2 over more processes" in said and "teacher.source=cache" in said
    assert "train.batch_size=1 with train.grad_accum=2" in said
    # FSDP2 halves the AdamW states over 2 processes; DDP doubles the gradients (its buckets)
    one, ddp, sharded = (
        {x.name: x.bytes for x in make_plan(recipe, processes=n, engine=e, tflops=400).lines}
        for n, e in ((1, "ddp"), (2, "ddp"), (2, "fsdp2"))
    )
    assert sharded["AdamW states"] == one["AdamW states"] / 2 == ddp["AdamW states"] / 2
    assert ddp["gradients"] == 2 * one["gradients"]
