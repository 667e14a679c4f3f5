"""The training loop on tiny random models: learning, checkpoints, exact resume, NaN guard,
exact gradient accumulation, and the saved student."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from potstill import students
from potstill.data import tokenize_records
from potstill.errors import NonFiniteLoss
from potstill.methods import build_method
from potstill.models import prune_layers
from potstill.recipe import load_recipe
from potstill.train import lr_multiplier, train

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
        ]
    }
    for a, b in [(1, 2), (3, 4), (10, 7), (8, 8), (12, 30), (5, 9), (21, 21), (6, 1)]
] + [
    {"text": "To be, or not to be, that is the question."},
    {"prompt": "Say hi:", "completion": " hi there"},
]


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer, tiny_llama):
    tok = smollm2_tokenizer
    teacher = tiny_llama(len(tok), seed=1)
    examples, _ = tokenize_records(RECORDS, tok, max_length=64)
    return tok, teacher, examples


def run(tmp_path, setup, *overrides, student=None, method_patch=None, on_log=None):
    tok, teacher, examples = setup
    recipe = load_recipe(
        None,
        [
            "teacher.model=unused", "student.init=prune", "student.keep_layers=[0, 3]",
            f"train.output_dir={tmp_path}", "train.batch_size=2", "train.lr=1e-2", "train.warmup_steps=1",
            "train.precision=fp32", "train.log_every=1", "train.save_every=2", *overrides,
        ],
    )  # fmt: skip
    method = build_method(recipe, vocab_size=len(tok))
    if method_patch:
        method = method_patch(method)
    if student is None:
        student = prune_layers(teacher, [0, 3])
    if not students.is_transformed(student):  # (a LoRA student keeps its frozen weights frozen)
        student.requires_grad_(True)
    result = train(
        recipe, method, student=student, tokenizer=tok, train_examples=examples, eval_examples=examples[:4],
        teacher=teacher if method.needs_teacher else None, eval_teacher=teacher, vocab_size=len(tok), on_log=on_log,
    )  # fmt: skip
    return result, student


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kd_learns_and_writes_everything(tmp_path, setup):
    result, student = run(tmp_path, setup, "train.max_steps=12", "train.eval_every=6")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # it learns
    kl = [r["eval/teacher_kl"] for r in result.history if "eval/teacher_kl" in r]
    assert len(kl) == 2 and kl[-1] < kl[0] + 1e-6 and result.eval["teacher_kl"] == kl[-1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "soft", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert (tmp_path / "recipe.yaml").is_file() and any((tmp_path / "tensorboard").iterdir())
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 12
    assert (ckpt / "model.safetensors").is_file()
    # the final student is a loadable Hugging Face directory with the tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert loaded.config.num_hidden_layers == 2
    for k, v in load_file(result.model_dir / "model.safetensors").items():
        torch.testing.assert_close(v, student.state_dict()[k])
    assert (result.model_dir / "tokenizer_config.json").is_file()


def test_sft_runs_without_teacher(tmp_path, setup):
    result, _ = run(tmp_path, setup, "method=sft", "train.max_steps=3")
    assert result.steps == 3 and "hard" in result.history[0] and "soft" not in result.history[0]
    assert "teacher_kl" in result.eval  # still measured against the eval teacher


def test_resume_after_crash_is_exact(tmp_path, setup):
    _, teacher, _ = setup
    _, s1 = run(tmp_path / "a", setup, "train.max_steps=5", student=prune_layers(teacher, [0, 3]))

    def crash(row):
        if row["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        run(
            tmp_path / "b",
            setup,
            "train.max_steps=5",
            student=prune_layers(teacher, [0, 3]),
            on_log=crash,
        )
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed, s2 = run(
        tmp_path / "b", setup, "train.max_steps=5", student=prune_layers(teacher, [0, 3])
    )
    assert resumed.steps == 5
    for k, v in weights(s1).items():
        torch.testing.assert_close(weights(s2)[k], v, rtol=0, atol=0)
    # the metrics history is continuous: steps 1..5 once each
    steps = [r["step"] for r in resumed.history if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, setup):
    calls = {"n": 0}

    def poison(method):
        original = method.loss

        def loss(*args, **kwargs):
            calls["n"] += 1
            sums = original(*args, **kwargs)
            if calls["n"] == 3:
                sums.loss = sums.loss * float("nan")
            return sums

        method.loss = loss
        return method

    with pytest.raises(NonFiniteLoss, match=r"step 3.*untouched"):
        run(tmp_path, setup, "train.max_steps=5", method_patch=poison)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (tmp_path / "model").exists()


def test_gradient_accumulation_is_exact(tmp_path, setup):
    _, teacher, _ = setup
    _, a = run(
        tmp_path / "a",
        setup,
        "train.max_steps=1",
        "train.batch_size=4",
        student=prune_layers(teacher, [0, 3]),
    )
    _, b = run(
        tmp_path / "b", setup, "train.max_steps=1", "train.batch_size=2", "train.grad_accum=2",
        student=prune_layers(teacher, [0, 3]),
    )  # fmt: skip
    for k, v in weights(a).items():
        torch.testing.assert_close(weights(b)[k], v, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs(tmp_path, setup):
    result, _ = run(tmp_path, setup, "train.max_steps=2", "train.precision=bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history if "loss" in r)


@pytest.mark.parametrize("faster", [True, False])
def test_auto_precision_follows_the_measured_bf16_speed(
    tmp_path, setup, monkeypatch, capsys, faster
):
    from potstill import utils

    monkeypatch.setattr(utils, "bf16_is_faster", lambda device_type: faster)
    from potstill.recipe import TrainSpec

    assert TrainSpec().precision == "auto"  # the default
    assert utils.autocast_dtype("auto", "cpu") == (torch.bfloat16 if faster else None)
    run(tmp_path, setup, "train.max_steps=1", "train.precision=auto")
    expected = "bf16 autocast" if faster else "precision auto: fp32; bf16 matmuls are slower"
    assert expected in capsys.readouterr().out


def test_bf16_speed_is_measured_once_per_process():
    from potstill.utils import bf16_is_faster

    bf16_is_faster.cache_clear()
    state = torch.get_rng_state()
    assert isinstance(bf16_is_faster("cpu"), bool)
    assert torch.equal(torch.get_rng_state(), state)  # seeded runs draw what they drew before
    assert bf16_is_faster.cache_info().currsize >= 1 and bf16_is_faster("mps") is False


def test_lr_schedule_shapes():
    kw = dict(total=100, warmup=10, min_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(99, schedule="cosine", **kw) == pytest.approx(0.1, abs=2e-3)
    assert lr_multiplier(55, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(80, schedule="constant", **kw) == 1.0


def test_fused_and_naive_paths_train_identically(tmp_path, setup):
    _, teacher, _ = setup
    runs = {}
    for path in ("fused", "naive"):
        result, student = run(
            tmp_path / path, setup, "train.max_steps=3", f"loss.path={path}", "loss.hard_weight=0.2",
            "loss.kind=jsd", student=prune_layers(teacher, [0, 3]),
        )  # fmt: skip
        runs[path] = (result, weights(student))
    for k, v in runs["naive"][1].items():  # atol relative to Adam steps of ~1e-2
        torch.testing.assert_close(runs["fused"][1][k], v, rtol=1e-4, atol=1e-4)
    fused_rows = [r for r in runs["fused"][0].history if "loss" in r]
    naive_rows = [r for r in runs["naive"][0].history if "loss" in r]
    for a, b in zip(fused_rows, naive_rows, strict=True):
        assert a["soft"] == pytest.approx(b["soft"], rel=1e-4) and a["hard"] == pytest.approx(
            b["hard"], rel=1e-4
        )


def transformed(setup, *overrides):
    """A pruned student through the recipe's student seam (LoRA / QAT), as `potstill train` does."""
    recipe = load_recipe(
        None,
        ["teacher.model=unused", "student.init=prune", "student.keep_layers=[0, 3]", *overrides],
    )
    return students.prepare(prune_layers(setup[1], [0, 3]).requires_grad_(True), recipe.student)


LORA = ("student.lora.r=4", "student.lora.target_modules=[q_proj, v_proj, down_proj, lm_head]")
QAT = ("student.qat.format=q4_0",)


@pytest.mark.parametrize("transform", [LORA, QAT], ids=["lora", "qat"])
def test_lora_and_qat_students_train_the_same_on_the_fused_and_naive_paths(
    tmp_path, setup, transform
):
    """The fused loss reads a LoRA head as base + (α/r)·BA and a QAT head on its grid: the same
    updates as the naive path, which runs the head module itself."""
    runs = {}
    for path in ("fused", "naive"):
        student = transformed(setup, *transform)
        result, _ = run(
            tmp_path / path, setup, "train.max_steps=3", f"loss.path={path}", *transform,
            student=student,
        )  # fmt: skip
        runs[path] = (result, weights(student))
    for k, v in runs["naive"][1].items():
        # Adam turns float noise in a near-zero gradient (rare tokens' rows of the head's
        # adapter B) into a full-size step; all but a handful of entries agree to 1e-4
        off = ((runs["fused"][1][k] - v).abs() > 1e-4).float().mean()
        assert off < 1e-3, (k, off)
    soft = [[r["soft"] for r in runs[p][0].history if "soft" in r] for p in ("fused", "naive")]
    assert len(soft[0]) == 3 and soft[0] == pytest.approx(soft[1], rel=1e-3, abs=1e-6)
    start = weights(transformed(setup, *transform))
    changed = {k for k, v in runs["fused"][1].items() if not torch.equal(v, start[k])}
    if transform is LORA:  # only the adapters move
        assert changed and all("lora_" in k for k in changed)
        assert any("lm_head.lora_" in k for k in changed)
    else:  # every weight moves (the master weights behind the grid)
        assert "model.embed_tokens.parametrizations.weight.original" in changed


@pytest.mark.parametrize("transform", [LORA, QAT], ids=["lora", "qat"])
def test_lora_and_qat_students_resume_exactly(tmp_path, setup, transform):
    _, s1 = run(
        tmp_path / "a",
        setup,
        "train.max_steps=4",
        *transform,
        student=transformed(setup, *transform),
    )

    def crash(row):
        if row["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        run(
            tmp_path / "b", setup, "train.max_steps=4", *transform,
            student=transformed(setup, *transform), on_log=crash,
        )  # fmt: skip
    resumed, s2 = run(
        tmp_path / "b",
        setup,
        "train.max_steps=4",
        *transform,
        student=transformed(setup, *transform),
    )
    assert resumed.steps == 4
    for k, v in weights(s1).items():
        torch.testing.assert_close(weights(s2)[k], v, rtol=0, atol=0)
    # the saved student is a plain model: merged adapters / weights on the grid
    loaded = AutoModelForCausalLM.from_pretrained(resumed.model_dir)
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    with torch.no_grad():
        s2.eval()
        torch.testing.assert_close(loaded(ids).logits, s2(ids).logits, rtol=1e-5, atol=1e-5)


def test_padding_free_and_padded_batches_train_identically(tmp_path, setup, monkeypatch):
    import potstill.lm as lm

    _, teacher, _ = setup
    runs = {}
    for free in ("true", "false"):
        calls = lm._varlen_attention.calls
        result, student = run(
            tmp_path / free, setup, "train.max_steps=3", f"train.padding_free={free}",
            student=prune_layers(teacher, [0, 3]),
        )  # fmt: skip
        assert (lm._varlen_attention.calls > calls) == (free == "true")  # the switch is obeyed
        runs[free] = (result, weights(student))
    for k, v in runs["false"][1].items():
        torch.testing.assert_close(runs["true"][1][k], v, rtol=1e-4, atol=1e-4)
    losses = [[r["loss"] for r in runs[f][0].history if "loss" in r] for f in ("true", "false")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert lm.PADDING_FREE.get()  # the run's setting does not leak out of train()


def test_adamw_is_fused_on_cpu_for_a_single_process(tiny_llama):
    from accelerate import Accelerator

    from potstill.train import fused_adamw

    assert fused_adamw(tiny_llama(32), Accelerator()) is True
    assert fused_adamw(tiny_llama(32).to("meta"), Accelerator()) is None  # a device it lacks


def test_freed_memory_is_reused_without_page_faults():
    """Repeated fused-loss steps with two 50 MB logit buffers: with glibc's defaults each step
    maps them afresh (~31k page faults a step, measured); kept, they are mostly reused."""
    import resource
    import sys

    from potstill.losses.fused import fused_distill_loss
    from potstill.utils import keep_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 64, generator=g).requires_grad_()
    w = torch.randn(49152, 64, generator=g).requires_grad_()
    teacher_h, teacher_w = torch.randn(256, 64, generator=g), torch.randn(49152, 64, generator=g)
    labels = torch.randint(0, 49152, (256,), generator=g)

    def faults_of_a_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        w.grad = None
        fused_distill_loss(
            h, w, labels, teacher_hidden=teacher_h, teacher_weight=teacher_w, chunk_size=256
        ).backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [faults_of_a_step() for _ in range(5)]
    # Fresh mappings fault ~27k pages a step in (the buffers are ~110 MB); kept, the later steps
    # reuse them, less whatever a heap fragmented by earlier tests cannot place: measured 0 in a
    # fresh process, up to 11k in one step after other tests.
    assert sum(faults[1:]) < 2 * 27_000, faults


def test_a_methods_trainable_modules_are_trained_checkpointed_and_resumed(tmp_path, setup):
    """A module a method owns (here a projector before the student's head) is optimised with the
    student, saved in the checkpoint and restored on resume: a run interrupted in step 3 and
    resumed ends where an uninterrupted one does."""
    from dataclasses import dataclass, field

    from torch import nn

    from potstill.lm import final_hidden, head_logits
    from potstill.losses import distillation_sums
    from potstill.methods.sft import SFT

    @dataclass
    class Projected(SFT):
        proj: nn.Linear = field(default_factory=lambda: nn.Linear(32, 32))

        def trainable_modules(self):
            return {"proj": self.proj}

        def loss(self, student, teacher, batch):
            mask = batch["labels"] != self.ignore_index
            h = self.proj(final_hidden(student, batch)[mask])  # (N, H)
            logits = head_logits(student, h, self.vocab_size)  # (N, V)
            return distillation_sums(logits, None, batch["labels"][mask], hard_weight=1.0)

    def projected(_method):
        torch.manual_seed(3)
        return Projected(vocab_size=len(setup[0]))

    methods = []

    def keep(method, interrupt_at=0):
        methods.append(projected(method))
        original, calls = methods[-1].loss, [0]

        def loss(*args):
            calls[0] += 1
            if calls[0] == interrupt_at:
                raise KeyboardInterrupt  # what Ctrl-C raises, here inside step 3
            return original(*args)

        methods[-1].loss = loss
        return methods[-1]

    start = projected(None).proj.weight.detach().clone()
    _, whole = run(tmp_path / "a", setup, "method=sft", "train.max_steps=4", method_patch=keep)
    assert not torch.equal(methods[-1].proj.weight, start)  # the projector trained
    saved = load_file(
        tmp_path / "a" / "checkpoint" / "model.safetensors"
    )  # one model for the engine
    assert "method_modules.proj.weight" in saved and "module.model.norm.weight" in saved
    assert (tmp_path / "a" / "proj.safetensors").is_file()  # and beside the student at the end
    assert not any(
        k.startswith(("proj", "method_modules"))
        for k in load_file(tmp_path / "a" / "model" / "model.safetensors")
    )
    with pytest.raises(KeyboardInterrupt):
        run(
            tmp_path / "b",
            setup,
            "method=sft",
            "train.max_steps=4",
            method_patch=lambda m: keep(m, 3),
        )
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    _, resumed = run(tmp_path / "b", setup, "method=sft", "train.max_steps=4", method_patch=keep)
    torch.testing.assert_close(methods[-1].proj.weight, methods[0].proj.weight, rtol=0, atol=0)
    for k, v in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=0, atol=0)


def test_a_resumed_run_with_a_longer_horizon_steps_at_its_own_schedule(
    tmp_path, setup, monkeypatch
):
    """The optimizer's saved lr belongs to the first run's schedule; the resumed run's first step
    takes the lr of its own (here cosine over 6 steps instead of 2)."""
    used = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    common = ("method=sft", "train.warmup_steps=1", "train.min_lr_ratio=0.1")
    run(tmp_path, setup, *common, "train.max_steps=2")
    run(tmp_path, setup, *common, "train.max_steps=6")
    expected = 1e-2 * lr_multiplier(2, total=6, warmup=1, schedule="cosine", min_ratio=0.1)
    assert used[2] == pytest.approx(expected) and used[2] != pytest.approx(used[1])
