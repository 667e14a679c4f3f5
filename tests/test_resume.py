"""Exact resume after real signals, and seeded runs: `potstill train` in a subprocess on a tiny
model (CPU, fp32), interrupted with SIGINT in the middle of a step or killed with SIGKILL after
its first checkpoint, then run again — its final weights must equal an uninterrupted run's bit for
bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _signals import loss_marker_prelude
from _sums import sft_recipe
from safetensors.torch import load_file

from potstill.prepare import load_models
from potstill.recipe import load_recipe

GRAD_ACCUM = 4
STEPS = 6
SAVE_EVERY = 2

PRELUDE = loss_marker_prelude("potstill.methods.sft", "SFT")  # tests/_signals.py


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_chat_lm):
    """(recipe path, overrides builder): an SFT recipe over a tiny saved Llama and 40 records."""
    root = tmp_path_factory.mktemp("resume")
    train = (
        f"max_steps: {STEPS}, batch_size: 2, grad_accum: {GRAD_ACCUM}, lr: 0.01, warmup_steps: 2, "
        f"save_every: {SAVE_EVERY}, log_every: 1"
    )
    return sft_recipe(root, *tiny_chat_lm, train)


def start(
    recipe: Path, out: Path, pause_at: int = 0, overrides: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, Path]:
    marker = out.with_name(out.name + ".calls")
    marker.unlink(missing_ok=True)
    env = {**os.environ, "MARKER": str(marker), "PAUSE_AT": str(pause_at)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PRELUDE,
            "train",
            str(recipe),
            *overrides,
            f"train.output_dir={out}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, marker


def wait_for_call(proc: subprocess.Popen, marker: Path, call: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and len(marker.read_text().split()) >= call:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before loss call {call}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"loss call {call} did not come within {timeout} s")


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out[-3000:]
    return out


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    """A function giving the uninterrupted run's final weights; the run starts at once and goes
    on beside the first test's own run, and is waited for when first asked for."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    proc, _ = start(tiny_run, out)
    weights = {}

    def get() -> dict[str, torch.Tensor]:
        if not weights:
            finish(proc)
            weights.update(final_weights(out))
        return weights

    yield get
    if proc.poll() is None:
        proc.kill()


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def test_sigint_in_the_middle_of_a_step_resumes_exactly(tiny_run, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    step, micro = 3, 2  # the second micro-batch of step 3: step 3's first one is already summed
    call = (step - 1) * GRAD_ACCUM + micro
    proc, marker = start(tiny_run, out, pause_at=call)
    wait_for_call(proc, marker, call)
    proc.send_signal(signal.SIGINT)
    log = finish(proc, expect=130)
    assert "interrupted at step 2: checkpoint saved" in log
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    # the checkpoint is the state step 3 began with: 2 steps done, data at their boundary
    assert state["step"] == 2 and state["position"] == {"epoch": 0, "batch": 2 * GRAD_ACCUM}
    proc, _ = start(tiny_run, out)
    assert "resuming from" in finish(proc)
    assert_bit_identical(final_weights(out), uninterrupted())


def test_sigkill_after_the_first_checkpoint_resumes_exactly(tiny_run, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # any micro-batch after the first checkpoint (end of step SAVE_EVERY), up to the last step
    seed = int.from_bytes(os.urandom(2), "little")
    call = random.Random(seed).randrange(SAVE_EVERY * GRAD_ACCUM + 1, STEPS * GRAD_ACCUM + 1)
    proc, marker = start(tiny_run, out, pause_at=call)
    wait_for_call(proc, marker, call)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= SAVE_EVERY and saved % SAVE_EVERY == 0
    assert not (out / "model").exists()
    proc, _ = start(tiny_run, out)
    assert f"at step {saved}/{STEPS}" in finish(proc), f"killed at loss call {call}"
    assert_bit_identical(final_weights(out), uninterrupted())


def test_a_random_init_follows_train_seed(tiny_chat_lm, tmp_path):
    """student.init=config: two runs draw the same student whatever the global RNG holds, and
    another train.seed draws another."""
    model, tokenizer = tiny_chat_lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    def student(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        recipe = load_recipe(
            None,
            [
                "method=sft",
                f"student.model={tmp_path / 'model'}",
                "student.init=config",
                "student.config_overrides.num_hidden_layers=1",
                f"train.seed={seed}",
            ],
        )
        torch.manual_seed(global_seed)
        return load_models(recipe).student.state_dict()

    first, second = student(7, global_seed=1), student(7, global_seed=2)
    assert_bit_identical(first, second)
    other = student(8, global_seed=1)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    "overrides",
    [("student.lora.r=4", "student.lora.target_modules=[q_proj, v_proj, lm_head]"),
     ("student.qat.format=q4_0",)],
    ids=["lora", "qat"],
)  # fmt: skip
def test_sigkill_resumes_lora_and_qat_students_exactly(tiny_run, tmp_path, overrides):
    """The adapters (LoRA) and the master weights behind the grid (QAT) are what a checkpoint
    holds; a killed run ends with the saved student an uninterrupted one saves."""
    whole, _ = start(tiny_run, tmp_path / "whole", overrides=overrides)  # beside the killed run
    out = tmp_path / "killed"
    call = (SAVE_EVERY + 1) * GRAD_ACCUM + 1  # the first micro-batch after the first checkpoint
    proc, marker = start(tiny_run, out, pause_at=call, overrides=overrides)
    wait_for_call(proc, marker, call)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finish(whole)
    proc, _ = start(tiny_run, out, overrides=overrides)
    assert f"at step {SAVE_EVERY}/{STEPS}" in finish(proc)
    assert_bit_identical(final_weights(out), final_weights(tmp_path / "whole"))
