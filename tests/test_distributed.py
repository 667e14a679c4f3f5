"""Several processes on this CPU (gloo), launched as users launch them: ``accelerate launch`` with
the configs in configs/accelerate/. Every method trains under 2-process DDP, FSDP2, DeepSpeed ZeRO-2
and ZeRO-3 and ends where one process with ``grad_accum=2`` over the same global batches does; a
2-process run (DDP, ZeRO-3) killed after its first checkpoint resumes to the uninterrupted run's
weights bit for bit.
"""

from __future__ import annotations

import importlib.util
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
from potstill.utils import folder_bytes

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
    # samples checked against each record's answer; a rejected one gives way to the data's row
    "on_policy_verified": "on_policy: {max_new_tokens: 6, lmbda: 0.5, verify: number}\n",
    "cross_tokenizer": "cross_tokenizer: {alignment: uld}\n",
    "feature": "feature: {hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0}\n",
    "draft": "draft: {eval_prompts: 2, eval_new_tokens: 4}\n",
    "embedding": "embedding: {relation_weight: 1.0}\n",
}


# configs/accelerate/ENGINE.yaml; DeepSpeed's where the deepspeed extra is installed (make does)
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = ("ddp", "fsdp2", *(("zero2", "zero3") if HAVE_DEEPSPEED else ()))
NO_DEEPSPEED = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")


def engines(*names: str) -> list:
    """pytest parameters of ``names``, DeepSpeed's skipped without the package."""
    return [pytest.param(n, marks=NO_DEEPSPEED) if n.startswith("zero") else n for n in names]


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_pair_dirs):
    """(folder, {method: recipe path}): tiny recipes of every method (and a teacher read from a cache) over the tiny pair (a
    narrower student for `feature`, so it has projectors; a tiny BERT sentence encoder for `embedding`)."""
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
    tiny_sentence_encoder(root / "encoder")
    rows = [
        {"prompt": f"{a}+{b}=", "completion": f" {a + b}", "answer": str(a + b)}
        for a in range(10)
        for b in (3, 7)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    data = f"data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_length: 32}}\n"
    recipes = {}
    for run, extra in RUNS.items():
        method = run.removesuffix("_cached").removesuffix("_verified")
        if method == "embedding":
            models = f"teacher: {{model: {root / 'encoder'}}}\n"
            models += "student: {init: prune, keep_layers: [0, 3]}\n"
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


def tiny_sentence_encoder(folder: Path) -> None:
    """A 4-layer, 32-wide BERT sentence encoder with all-MiniLM-L6-v2's tokenizer and
    sentence-transformers modules (mean pooling, normalised)."""
    import shutil

    from transformers import BertConfig, BertModel

    from potstill.bundled_models import resolve_bundled_model

    shutil.copytree(
        resolve_bundled_model("all-minilm-l6-v2"), folder,
        ignore=shutil.ignore_patterns("model.safetensors", "config.json"),
    )  # fmt: skip
    torch.manual_seed(5)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(folder)


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


STEPS = 12  # of the resumed runs: long enough that the kill lands well before the end
RESUMED = ("ddp", "zero3")  # the engines whose runs are killed and resumed
# LoRA and QAT students (token_level), under the engines that keep the weights whole
TRANSFORMED = {"lora": ["student.lora.r=4"], "qat": ["student.qat.format=q8_0"]}
WHOLE_WEIGHTS = ("ddp", "zero2")


def resume_steps(folder: Path) -> list[str]:
    return [f"train.max_steps={STEPS}", "train.save_every=2", f"train.output_dir={folder}"]


@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """{engine: {method: run folder}}: one process with grad_accum=2 (in this process), and two
    processes with grad_accum=1 under each engine (one launch each, the launches side by side;
    those of RESUMED also train the uninterrupted run the resume test compares with)."""
    _, recipes = table
    out = tmp_path_factory.mktemp("runs")
    names = [*recipes, *TRANSFORMED]
    folders = {e: {m: out / e / m for m in names} for e in ("one", *ENGINES)}
    folders["said"], folders["whole"] = {}, {}
    launches = {}
    argv = {m: ["train", str(recipes[m]), *source(m)] for m in recipes}
    for name, extra in TRANSFORMED.items():
        argv[name] = ["train", str(recipes["token_level"]), *extra]
    for engine in ENGINES:
        runs_here = [*recipes, *(TRANSFORMED if engine in WHOLE_WEIGHTS else ())]
        jobs = [[*argv[m], f"train.output_dir={folders[engine][m]}"] for m in runs_here]
        if engine in RESUMED:
            folders["whole"][engine] = out / engine / "whole"
            jobs.append([*argv["token_level"], *resume_steps(folders["whole"][engine])])
        launches[engine] = launch(engine, jobs, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside 8 single-threaded workers: more threads only contend
    try:
        for run in names:  # meanwhile
            one = [*argv[run], "train.grad_accum=2", f"train.output_dir={folders['one'][run]}"]
            assert main(one) == 0, run
    finally:
        torch.set_num_threads(threads)
    for engine, proc in launches.items():
        said = finish(proc)
        done = said.count("done: 3 steps")  # the first process only
        assert done == len(recipes) + len(TRANSFORMED) * (engine in WHOLE_WEIGHTS), said[-3000:]
        folders["said"][engine] = said
    return folders


@pytest.mark.parametrize("engine", engines("ddp", "fsdp2", "zero2", "zero3"))
@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_train_as_one_with_the_same_global_batches(runs, engine, run):
    assert_trained_alike(runs["one"][run], runs[engine][run])


@pytest.mark.parametrize("engine", ["one", *engines("ddp", "fsdp2", "zero2", "zero3")])
def test_the_verified_run_checked_the_students_samples(runs, engine):
    rows = train_rows(runs[engine]["on_policy_verified"])
    shares = [r["student_correct_share"] for r in rows if "student_correct_share" in r]
    assert shares and all(0 <= x <= 1 for x in shares), rows


@pytest.mark.parametrize("engine", engines(*WHOLE_WEIGHTS))
@pytest.mark.parametrize("student", list(TRANSFORMED))
def test_lora_and_qat_students_train_in_two_processes_as_in_one(runs, engine, student):
    # QAT saves its weights rounded to the Q8_0 grid, where rounding noise in a weight that lies
    # on a rounding boundary moves it by a grid step: 1 in 1,000 may
    flips = 1 / 1000 if student == "qat" else 1 / 100_000
    assert_trained_alike(runs["one"][student], runs[engine][student], flips)


def assert_trained_alike(one: Path, two: Path, flips: float = 1 / 100_000) -> None:
    """The same saved tensors (but a ``flips`` share of each tensor's elements: see below), and
    the same global loss, gradient norm and tokens every step."""
    a, b = saved(one), saved(two)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("attention.self.key.bias"):  # BERT's key bias: its true gradient is 0 (a
            continue  # shift of every score in a row), so AdamW turns rounding noise into steps
        # AdamW's first steps are ±lr wherever a gradient is tiny, so summation order alone can
        # move such an element by a step: 1 in 100,000 may,
        # and no further than the run's 3 steps of lr 0.01
        far = (b[k] - a[k]).abs() > 2e-4 + 1e-3 * a[k].abs()
        assert int(far.sum()) <= int(a[k].numel() * flips), (k, int(far.sum()), a[k].numel())
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.03, msg=k)
    rows_a, rows_b = train_rows(one), train_rows(two)
    assert [r["tokens"] for r in rows_b] == [r["tokens"] for r in rows_a]  # all processes counted
    for ra, rb in zip(rows_a, rows_b, strict=True):  # the global loss and gradient, every step
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    ("engine", "says", "teacher"),
    [
        ("ddp", "DDP (gloo)", "a copy per process"),
        ("fsdp2", "FSDP2", "sharded"),
        pytest.param("zero2", "DeepSpeed ZeRO-2", "a copy per process", marks=NO_DEEPSPEED),
        pytest.param("zero3", "DeepSpeed ZeRO-3", "sharded", marks=NO_DEEPSPEED),
    ],
)
def test_each_run_says_its_engine_and_the_sharding_engines_shard_the_teacher(
    runs, engine, says, teacher
):
    said = runs["said"][engine]
    # every run but sft's, sequence_level's and the cache's; the resumed and transformed ones
    teachers = len(RUNS) - 3 + (engine in RESUMED) + len(TRANSFORMED) * (engine in WHOLE_WEIGHTS)
    assert said.count(f"engine: {says}, 2 processes; teacher: {teacher}") == teachers
    assert said.count(f"engine: {says}, 2 processes; teacher: none") == 3
    checkpoint = runs[engine]["token_level"] / "checkpoint"
    shards = {  # each process wrote its part of the weights or optimizer states
        "fsdp2": ["pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"],
        "zero2": [f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)],
        "zero3": [f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)],
    }
    for shard in shards.get(engine, []):
        assert (checkpoint / shard).is_file(), sorted(p.name for p in checkpoint.rglob("*"))


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


@pytest.mark.parametrize("engine", engines(*RESUMED))
def test_a_killed_two_process_run_resumes_exactly(table, runs, tmp_path, engine):
    """SIGKILL to the whole launch (launcher and both workers) once the first checkpoint is in,
    then the same launch again: the final weights equal an uninterrupted 2-process run's (under
    ZeRO-3: DeepSpeed's own checkpoint of partitions, the lr schedule set from the step)."""
    _, recipes = table
    whole, cut = runs["whole"][engine], tmp_path / "cut"
    job = [["train", str(recipes["token_level"]), *resume_steps(cut)]]
    proc = launch(engine, job, tmp_path)
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
    said = finish(launch(engine, job, tmp_path))
    assert f"resuming from {cut / 'checkpoint'} at step {state['step']}/{STEPS}" in said
    a, b = saved(whole), saved(cut)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def potstill(*argv: str) -> subprocess.Popen:
    """``potstill ARGV`` in a fresh process, as a user runs it (stdout piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "potstill.cli", *argv], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip


def planned(proc: subprocess.Popen) -> tuple[float, float]:
    """`potstill plan`'s (total memory per process, one checkpoint on disk), in MiB."""
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    patterns = (r"^\s+total\s+([\d.]+) (.iB)", r"a checkpoint of ≈ ([\d.]+) (.iB)")
    found = [re.search(pattern, out, re.M).groups() for pattern in patterns]
    return tuple(float(value) * {"GiB": 1024, "MiB": 1, "KiB": 1 / 1024}[u] for value, u in found)


def peak_mb(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["peak_memory_mb"]


def test_the_plan_is_within_a_quarter_of_the_measured_peak(table, runs, tmp_path):
    """One process (its own subprocess, so that its peak is its own), and the 2-process runs of
    the same recipe under each engine; the plans and the lone run side by side (a plan's memory
    is its own process's, whatever else runs), and each plan's checkpoint against the one its
    run wrote."""
    _, recipes = table
    recipe = str(recipes["token_level"])
    alone = tmp_path / "alone"
    lone = potstill("train", recipe, f"train.output_dir={alone}")
    plans = {"one process": potstill("plan", recipe, "--tflops", "1")}
    for engine in ENGINES:
        plans[engine] = potstill(
            "plan", recipe, "--tflops", "1", "--processes", "2", "--engine", engine
        )
    lone.communicate(timeout=300)
    assert lone.returncode == 0
    cases, disk = {}, {}
    for name, proc in plans.items():
        run = runs[name]["token_level"] if name in runs else alone
        (memory, checkpoint), written = planned(proc), folder_bytes(run / "checkpoint") / 2**20
        cases[name], disk[name] = (memory, peak_mb(run)), checkpoint / written - 1
    errors = {k: plan / peak - 1 for k, (plan, peak) in cases.items()}
    assert all(abs(e) <= 0.25 for e in errors.values()), (errors, cases)
    # the plan counts tensor bytes: never more than a checkpoint holds, and on these ~22K-
    # parameter models per-file and per-tensor records (FSDP2's distributed checkpoint above
    # all: −55%) add up to half of it; benchmarks/plan_memory.py measures the bundled pair
    assert all(-0.7 <= e <= 0 for e in disk.values()), disk
    print({k: f"{e:+.1%}" for k, e in errors.items()}, {k: f"{e:+.1%}" for k, e in disk.items()})


def test_what_is_not_supported_yet_is_refused_naming_the_launch_that_works():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from potstill import distributed
    from potstill.errors import RecipeError

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    with pytest.raises(RecipeError, match=r"student.lora and student.qat.*FSDP2.*ddp.yaml"):
        distributed.check_student(fsdp, transformed=True)
    distributed.check_student(fsdp, transformed=False)  # a plain student is fine
    plugin = SimpleNamespace(zero_stage=2, deepspeed_config={"bf16": {"enabled": True}})
    zero2 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=2,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )
    distributed.check_student(zero2, transformed=True)  # trained: see the LoRA and QAT test
    plugin.zero_stage = 3
    with pytest.raises(RecipeError, match=r"student.lora and student.qat.*ZeRO-3.*zero2.yaml"):
        distributed.check_student(zero2, transformed=True)
    plugin.zero_stage = 2
    with pytest.raises(RecipeError, match=r"turns on bf16.*train.precision=bf16"):
        distributed.configure_deepspeed(zero2, batch_size=2, grad_accum=1, max_grad_norm=1.0)
    plugin.deepspeed_config = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}
    distributed.configure_deepspeed(zero2, batch_size=2, grad_accum=3, max_grad_norm=None)
    assert plugin.deepspeed_config["train_batch_size"] == 12  # 2 × 3 × 2 processes
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # train.max_grad_norm: none


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
