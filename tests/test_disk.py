"""A disk too small for a run: refused before the first step, with what it needs; a disk that fills
up in the middle of a run: a one-line error, the partial checkpoint removed, the last one left
untouched, and the same command, once space is freed, resumes to the weights of an uninterrupted
run. The real thing: `potstill train` on a tmpfs of a chosen size, mounted in a private mount
namespace (tests/_tmpfs.py; skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _sums import sft_recipe
from _tmpfs import can_mount, in_private_mounts
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.train import checkpoint_bytes, state_sizes
from potstill.utils import NEARLY_FULL, folder_bytes, out_of_disk

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, FILL_AT = 6, 2, 3  # the disk fills in step 3: step 4's checkpoint fails
SLACK = 256 * 2**10  # left free after the fill: the log goes on, a checkpoint does not fit

# `potstill train` with one change: at its FILL_AT-th loss call it fills the disk of FILLER up to
# SLACK free bytes, as another program might
FILL_PRELUDE = """
import os, sys
from potstill.methods.sft import SFT
fill_at, filler, slack = int(os.environ["FILL_AT"]), os.environ["FILLER"], int(os.environ["SLACK"])
original, calls = SFT.loss, [0]
def loss(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == fill_at:
        s = os.statvfs(os.path.dirname(filler))
        with open(filler, "wb") as f:
            f.write(bytes(max(s.f_bavail * s.f_frsize - slack, 0)))
    return original(self, *args, **kwargs)
SFT.loss = loss
from potstill.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_lm):
    """(recipe, its student): SFT on a 2-layer Llama of ~0.4M parameters over the tiny character
    vocabulary (a checkpoint of ~3.5 MiB), a checkpoint every 2 of 6 steps."""
    root = tmp_path_factory.mktemp("disk")
    tokenizer = tiny_chat_lm[1]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    student = LlamaForCausalLM(config)
    train = (
        f"max_steps: {STEPS}, batch_size: 2, lr: 0.01, warmup_steps: 1, "
        f"save_every: {SAVE_EVERY}, log_every: 1"
    )
    return sft_recipe(root, student, tokenizer, train), student


def test_the_checkpoint_estimate_is_what_a_run_writes(setup, tmp_path):
    recipe, student = setup
    estimate = checkpoint_bytes(*state_sizes(student))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "potstill.cli", "train", str(recipe), f"train.output_dir={out}"],
        capture_output=True, text=True, timeout=300, env=env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    written = folder_bytes(out / "checkpoint")
    assert abs(written - estimate) < 0.02 * estimate, (written, estimate)


def test_what_counts_as_out_of_disk():
    assert out_of_disk(OSError(errno.ENOSPC, "No space left on device"), free=2**40)
    assert out_of_disk(SafetensorError("I/O error: No space left on device (os error 28)"), 2**40)
    torch_says = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
    )
    assert out_of_disk(torch_says, free=NEARLY_FULL - 1)  # torch.save names no cause
    assert not out_of_disk(torch_says, free=2**40)
    assert not out_of_disk(OSError(errno.EACCES, "Permission denied"), free=2**40)


@pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` and mount (root)")
def test_a_small_disk_is_refused_and_a_full_one_stops_with_the_last_checkpoint(setup, tmp_path):
    """One mount namespace, one tmpfs per case: (1) a disk with room for one checkpoint but not
    two is refused before the first step and left empty; (2) on a disk with room, another
    program fills it during step 3, step 4's checkpoint fails: exit 2, the partial checkpoint
    removed, step 2's untouched; the filler removed, the same command resumes from step 2 and
    ends with an uninterrupted run's weights, bit for bit."""
    recipe, student = setup
    checkpoint = checkpoint_bytes(*state_sizes(student))
    whole = tmp_path / "whole"
    reference = subprocess.Popen(
        [sys.executable, "-m", "potstill.cli", "train", str(recipe), f"train.output_dir={whole}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )  # fmt: skip
    prelude = tmp_path / "fill.py"
    prelude.write_text(FILL_PRELUDE)
    small, big, logs, copy = (tmp_path / n for n in ("small", "big", "logs", "copy"))
    for d in (small, big, logs):
        d.mkdir()
    train = f"{shlex.quote(sys.executable)} -m potstill.cli train {shlex.quote(str(recipe))}"
    script = f"""
    mount -t tmpfs -o size={int(1.5 * checkpoint)} tmpfs {small}
    {train} train.output_dir={small}/run > {logs}/small.out 2> {logs}/small.err
    echo $? > {logs}/small.rc; ls -A {small} > {logs}/small.ls
    mount -t tmpfs -o size={int(6 * checkpoint)} tmpfs {big}
    FILL_AT={FILL_AT} FILLER={big}/filler SLACK={SLACK} {shlex.quote(sys.executable)} {prelude} \
        train {shlex.quote(str(recipe))} train.output_dir={big}/run > {logs}/full.out 2> {logs}/full.err
    echo $? > {logs}/full.rc; ls -A {big}/run > {logs}/full.ls
    cat {big}/run/checkpoint/state.json > {logs}/full.state
    rm {big}/filler
    {train} train.output_dir={big}/run > {logs}/again.out 2> {logs}/again.err
    echo $? > {logs}/again.rc; cp -r {big}/run/model {copy}
    """
    in_private_mounts(script, env())
    said = {p.name: p.read_text() for p in logs.iterdir()}

    assert said["small.rc"].strip() == "2", said["small.err"][-2000:]
    error = said["small.err"].strip().splitlines()[-1]  # after the weights' loading bar
    assert error.startswith("potstill train: error: ") and "needs about" in error, error
    assert said["small.ls"].split() == []  # the refused run's folder is gone again

    assert said["full.rc"].strip() == "2", said["full.err"][-2000:]
    error = said["full.err"].strip().splitlines()[-1]
    assert "ran out while writing the checkpoint of step 4" in error, error
    assert "the checkpoint of step 2" in error and "run the same command again" in error, error
    assert "checkpoint.tmp" not in said["full.ls"].split()
    assert '"step": 2' in said["full.state"]

    assert said["again.rc"].strip() == "0", said["again.err"][-2000:]
    assert "resuming from" in said["again.out"] + said["again.err"]
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-2000:]
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(copy / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
