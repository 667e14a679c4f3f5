"""The one training loop. Every method drives it; it knows nothing about any method's maths.

One optimizer step (the hooks are :class:`potstill.methods.base.Method`'s, called on every method):
  1) draw ``grad_accum`` micro-batches, let the method make its sequences (``method.sequences``:
     on-policy sampling rewrites them, the default keeps them), count their supervised tokens
     (``method.count_tokens``, all processes);
  2) for each: ``method.loss(...)`` (sums) divided once by that count
     (:func:`potstill.losses.normalise`), backward;
  3) refuse a non-finite loss or gradient (the last good checkpoint stays untouched);
  4) clip, AdamW step (fused where it can be), lr schedule step (under DeepSpeed its engine
     clips and steps at 3, and skips a non-finite step itself);
  5) log / evaluate / checkpoint on their intervals.
Checkpoints hold safetensors weights (the student's and the method's trainable modules'),
optimizer, scheduler, RNG states and the data position, and are swapped in atomically. An
interrupt (Ctrl-C, SIGINT) between or inside a step saves the state of the start of the step it
interrupted: the data position and RNG states the step began with, the weights it had not yet
changed, so a resumed run trains exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from potstill import distributed, students
from potstill.data import Example, collate
from potstill.errors import USER_ERRORS, NonFiniteLoss, RecipeError, RunStopped
from potstill.evaluate import evaluate, token_byte_lengths
from potstill.lm import padding_free, unwrap
from potstill.losses import normalise, step_normalizer
from potstill.methods.base import Method
from potstill.recipe import Recipe, StudentSpec, value_at
from potstill.utils import (
    atomic_write,
    autocast_dtype,
    folder_bytes,
    free_bytes,
    human_bytes,
    keep_freed_memory,
    pad_token_id,
    peak_memory_bytes,
    precision_note,
    require_free,
    return_freed_memory,
    when_disk_fills,
)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    steps: int
    tokens: int
    seconds: float  # wall time of this call's training steps (evaluation excluded)
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] | None = None
    peak_memory_bytes: int | None = None  # the most any process held (RSS peak on a CPU)


# ----------------------------------------------------------------------------- schedule


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    # 1) linear warm-up from lr/warmup to lr
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    # 2) decay from the peak to min_ratio · peak over the remaining steps
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def plan_steps(recipe: Recipe, examples: list[Example], num_processes: int = 1) -> int:
    """Optimizer steps implied by max_steps, max_tokens or epochs."""
    mean_tokens = sum(len(e.input_ids) for e in examples) / max(1, len(examples))
    return steps_for(recipe, len(examples), mean_tokens, num_processes)


def steps_for(recipe: Recipe, examples: int, mean_tokens: float, num_processes: int = 1) -> int:
    """Optimizer steps implied by max_steps, max_tokens or epochs over ``examples`` examples of
    ``mean_tokens`` tokens each (also what ``potstill plan`` counts from a data sample)."""
    t = recipe.train
    per_step = t.batch_size * t.grad_accum * num_processes
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / (mean_tokens * per_step)))
    return max(1, math.ceil(t.epochs * examples / per_step))


def fused_adamw(model: nn.Module, accelerator: Accelerator) -> bool | None:
    """PyTorch's fused AdamW (one kernel over all tensors; the same update) where it applies:
    CPU or CUDA parameters, one process or DDP — FSDP and DeepSpeed shard or replace the
    optimizer their own way, so they keep the default. A 49.6M-parameter student on a 2-core CPU:
    0.22 s per step for the default, 0.18 s ``foreach``, 0.037 s fused."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    )
    devices = {p.device.type for p in model.parameters() if p.requires_grad}
    return True if plain and devices <= {"cpu", "cuda"} else None


def param_groups(models: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the models' trainable parameters: no decay on biases, norms and other
    1-D tensors."""
    decay, no_decay = [], []
    for p in (p for m in models for p in m.parameters()):
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------- data order


def epoch_loader(
    examples: list[Example], *, batch_size: int, seed: int, epoch: int, pad_id: int
) -> DataLoader:
    """Batches of one epoch in a seeded order that depends only on (seed, epoch)."""
    order = torch.randperm(
        len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    )
    return DataLoader(
        [examples[i] for i in order.tolist()],
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda xs: collate(xs, pad_token_id=pad_id),
    )


def fixed_batches(
    examples: list[Example],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> list[dict[str, Tensor]]:
    """Collated batches in the given order (held-out sets), at most ``limit`` of them."""
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)][:limit]
    return [{k: v.to(device) for k, v in collate(c, pad_token_id=pad_id).items()} for c in chunks]


def batch_stream(
    accelerator: Accelerator,
    examples: list[Example],
    *,
    batch_size: int,
    seed: int,
    pad_id: int,
    position: dict,
) -> Iterator[dict[str, Tensor]]:
    """Endless batches from ``position`` (epoch, batch) on, updating it as they are consumed."""
    while True:
        loader = accelerator.prepare_data_loader(
            epoch_loader(
                examples, batch_size=batch_size, seed=seed, epoch=position["epoch"], pad_id=pad_id
            )
        )
        if position["batch"]:
            loader = accelerator.skip_first_batches(loader, position["batch"])
        for batch in loader:
            position["batch"] += 1
            yield batch
        position["epoch"] += 1
        position["batch"] = 0


# ----------------------------------------------------------------------------- checkpoints


def rng_states() -> dict[str, Any]:
    """Every RNG a step may draw from (Accelerate checkpoints the same ones)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete directory ``tmp`` without a moment where neither exists."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, out: Path, state: dict[str, Any]) -> Path:
    final = out / "checkpoint"
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with said_when_out_of_disk(tmp, out, f"the checkpoint of step {state['step']}"):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(
                json.dumps(state, indent=2)
            )  # written last: marks it complete
            _swap_in(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- disk


def checkpoint_bytes(
    state_bytes: float, trained_bytes: float, trained_params: float, *, zero: int | None = None
) -> float:
    """About what one checkpoint takes on disk (all processes' parts): the model's state as
    stored (``state_bytes``) and AdamW's two moments of each trained parameter, in its dtype
    (``trained_bytes``). DeepSpeed (ZeRO ``zero``) keeps its optimizer's fp32 copy of the
    trained weights with fp32 moments instead (12 bytes per trained parameter), and under ZeRO-3
    that copy is all it keeps of the weights. Scheduler and RNG states are a few KiB."""
    if zero is None:
        return state_bytes + 2 * trained_bytes
    return (0 if zero == 3 else state_bytes) + 12 * trained_params


def state_sizes(model: nn.Module, *, tied_once: bool = True) -> tuple[int, int, int]:
    """(bytes of ``model``'s state dict — tied weights once where ``tied_once``, as safetensors
    and DeepSpeed save them, but twice in FSDP2's distributed checkpoint; bytes and count of its
    trained parameters)."""
    seen: dict[Any, int] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel()) if tied_once else name
        seen[key] = tensor.numel() * tensor.element_size()
    trained = [p for p in model.parameters() if p.requires_grad]
    return (
        sum(seen.values()),
        sum(p.numel() * p.element_size() for p in trained),
        sum(p.numel() for p in trained),
    )


def check_disk(out: Path, checkpoint: float, model: float, *, replaced: bool) -> None:
    """Refuse a run whose folder's disk cannot take what it writes: a checkpoint that replaces
    another is written whole beside it first, so two at a time where one is ``replaced`` (less
    the one already there when resuming); else one, and the final model beside it."""
    there = folder_bytes(out / "checkpoint")
    need = (2 * checkpoint if replaced or there else checkpoint + model) - there
    require_free(
        out,
        need,
        lambda free: (
            f"train.output_dir {out}: its disk has {human_bytes(free)} free, and this run needs "
            f"about {human_bytes(need)} more (a checkpoint is {human_bytes(checkpoint)}: the "
            "weights and the optimizer's two moments per trained parameter; a new one is "
            "written beside the last before it replaces it). Free space there, or point "
            "train.output_dir at another disk"
        ),
    )


def said_when_out_of_disk(
    tmp: Path | None, out: Path, what: str
) -> contextlib.AbstractContextManager:
    """Around a write of the run in ``out`` (into ``tmp``, swapped in once whole, where there is
    one): when the disk runs out, remove the partial ``tmp`` and raise OutOfDisk naming the
    checkpoint that is left untouched."""

    def says() -> str:
        kept = find_checkpoint(out)
        ran_out = (
            f"the disk of {out} ran out while writing {what} "
            f"({human_bytes(free_bytes(out))} free now)"
        )
        if kept is None:
            return (
                f"{ran_out}; no checkpoint was written yet: free space (or point "
                "train.output_dir at another disk) and run again"
            )
        step = json.loads((kept / "state.json").read_text())["step"]
        return (
            f"{ran_out}; the checkpoint of step {step} ({kept}) is untouched: free space "
            "and run the same command again to resume from it"
        )

    cleanup = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if tmp else (lambda: None)
    return when_disk_fills(out, cleanup, says)


def find_checkpoint(out: Path) -> Path | None:
    ckpt = out / "checkpoint"
    if (ckpt / "state.json").is_file():
        return ckpt
    old = out / "checkpoint.old"  # a crash between the two renames of _swap_in
    return old if (old / "state.json").is_file() else None


def save_model(
    accelerator: Accelerator,
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    student: StudentSpec,
    gathered: dict[str, Tensor] | None = None,
) -> Path:
    """The student as a Hugging Face model directory (safetensors + config + tokenizer), through
    the student seam (LoRA merged or adapter-only, QAT weights on their grid). Every process calls
    this; the main process writes: ``model``'s own weights, or ``gathered`` where the engine
    shards them (the student's part of :func:`potstill.distributed.full_state_dict`)."""
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with said_when_out_of_disk(tmp, path.parent, f"the model ({path})"):
            tmp.mkdir(parents=True)
            students.save(
                unwrap(model),
                str(tmp),
                lora_save=student.lora.save,
                base=student.model,
                state_dict=gathered,
            )
            tokenizer.save_pretrained(tmp)
            _swap_in(tmp, path)
    accelerator.wait_for_everyone()
    return path


# ----------------------------------------------------------------------------- the student


class WithModules(nn.Module):
    """The student and a method's own trainable modules (e.g. projectors) as one module, so that
    every engine treats them as one model: DDP synchronises the modules' gradients with the
    student's, FSDP2 shards them into the student's root unit, a checkpoint holds them together.
    Calls go to the student; :func:`potstill.lm.unwrap` reaches it through ``module``."""

    def __init__(self, student: nn.Module, modules: dict[str, nn.Module]):
        super().__init__()
        self.module = student
        self.method_modules = nn.ModuleDict(modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def split_state_dict(
    state: dict[str, Tensor], names: list[str]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """A :class:`WithModules` state dict as (the student's, {module name: its own})."""
    student = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    modules = {
        name: {
            k.removeprefix(f"method_modules.{name}."): v
            for k, v in state.items()
            if k.startswith(f"method_modules.{name}.")
        }
        for name in names
    }
    return student, modules


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl (append, flushed per row) + TensorBoard, main process only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int = 0):
        self.out = out
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if enabled:
            path = out / "metrics.jsonl"
            if (
                resume_step and path.is_file()
            ):  # keep the history up to the checkpoint, drop the rest
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.rows = [r for r in rows if r["step"] <= resume_step]
            self.file = path.open("w")
            for row in self.rows:
                self.file.write(json.dumps(row) + "\n")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(out / "tensorboard"), purge_step=resume_step or None
                )
            except ImportError:  # tensorboard is a dependency, but stay usable without it
                self.writer = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with said_when_out_of_disk(None, self.out, "metrics.jsonl"):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            if self.writer is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, int | float):
                        self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(OSError):  # a full disk already said so; close regardless
                self.file.close()
            if self.writer is not None:
                with contextlib.suppress(OSError):
                    self.writer.close()
        self.enabled = False  # closed once; later rows are kept in memory only


# ----------------------------------------------------------------------------- the loop


def stopped(reason: str | None, step: int, out: Path) -> RunStopped:
    """The error that ends a run a method's guard stopped (``reason`` is None on a process whose
    own guard did not ask, when another's did)."""
    reason = reason or "another process's guard stopped the run (its message is in its log)"
    return RunStopped(
        f"stopped at step {step}: {reason}. The last checkpoint "
        f"({find_checkpoint(out) or 'none yet'}) is untouched."
    )


# What a resumed run shares with the run that wrote its folder; the rest (the horizon, intervals,
# the lr) may change between the parts of one run.
RUN_IDENTITY = (
    "method",
    "teacher.model",
    "student.model",
    "student.init",
    "student.keep_layers",
    "data.train",
)


def claim_output_dir(out: Path, recipe: Recipe) -> bool:
    """Refuse a ``train.output_dir`` that is a file or holds another run (its checkpoint would be
    resumed as this one's); True when the folder is this run's to create (absent or empty)."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"`train.output_dir` {out} is a file; point it at a folder")
    previous = out / "recipe.yaml"
    if previous.is_file():
        try:
            theirs = yaml.safe_load(previous.read_text())
        except yaml.YAMLError:
            theirs = None
        ours = recipe.to_dict()
        differ = [k for k in RUN_IDENTITY if value_at(theirs, k) != value_at(ours, k)]
        if differ:
            key = differ[0]
            raise RecipeError(
                f"`train.output_dir` {out} holds another run ({key} there: "
                f"{value_at(theirs, key)!r}, here: {value_at(ours, key)!r}); pick another "
                "train.output_dir, or remove that folder to start again"
            )
    return not out.exists() or not any(out.iterdir())


def _run_frame(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Around every run: its output folder claimed first (:func:`claim_output_dir`), every forward
    pass following ``train.padding_free``, and a folder the run created removed again when a user
    error ends it before its first checkpoint (nothing half-written is left behind; a guard's stop
    keeps its log)."""

    @functools.wraps(fn)
    def run(recipe: Recipe, *args: Any, **kwargs: Any) -> TrainResult:
        out = Path(recipe.train.output_dir)
        fresh = claim_output_dir(out, recipe)
        try:
            with padding_free(recipe.train.padding_free):
                return fn(recipe, *args, **kwargs)
        except RunStopped:  # a guard's stop: its log is the evidence, keep it
            raise
        except USER_ERRORS:
            first = int(os.environ.get("RANK", "0")) == 0
            if fresh and first and find_checkpoint(out) is None:
                shutil.rmtree(out, ignore_errors=True)
            raise

    return run


@_run_frame
def train(
    recipe: Recipe,
    method: Method,
    *,
    student: nn.Module,
    tokenizer: Any,
    train_examples: list[Example],
    eval_examples: list[Example] | None = None,
    teacher: nn.Module | None = None,
    eval_teacher: nn.Module | None = None,
    vocab_size: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``student`` with ``method``; see the module docstring for one step's anatomy.

    ``eval_teacher`` lets a run without a teacher in its objective (e.g. the CE baseline) still be
    measured against one; it defaults to ``teacher``.
    """
    t = recipe.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Autocast is ours, not Accelerate's: its precision is a process-wide singleton, and one
    # process may train several students (the demo does) at different precisions.
    accelerator = distributed.make_accelerator()
    distributed.configure_deepspeed(
        accelerator, batch_size=t.batch_size, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm
    )
    main = accelerator.is_main_process
    if accelerator.device.type == "cpu" and distributed.is_sharded(accelerator):
        return_freed_memory()  # FSDP2 gathers and frees every unit each pass: give it back
    elif t.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    set_seed(t.seed)
    if main:
        # whole or absent, even under kill -9: the next run reads it to know the folder is its own
        atomic_write(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method `{method.name}` needs a teacher model")
    eval_teacher = eval_teacher if eval_teacher is not None else teacher
    for model in {id(m): m for m in (teacher, eval_teacher) if m is not None}.values():
        model.requires_grad_(False).eval().to(accelerator.device)  # the teacher never trains
        distributed.shard_teacher(accelerator, model)  # FSDP2, ZeRO-3: 1/N of it per process

    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("the student has no trainable parameters (all have requires_grad=False)")
    distributed.check_student(accelerator, students.is_transformed(student))
    method.attach(student, teacher)
    named_extras = method.trainable_modules()  # e.g. projectors, trained alongside
    for module in named_extras.values():
        module.to(accelerator.device).train()
    # the one model the engine wraps: the student, with the method's modules where it has some
    model = WithModules(student, named_extras) if named_extras else student
    total_steps = plan_steps(recipe, train_examples, accelerator.num_processes)
    zero = distributed.deepspeed_stage(accelerator)
    fsdp = distributed.is_sharded(accelerator) and zero is None
    # whole, before any sharding
    state_bytes, trained_bytes, trained_params = state_sizes(model, tied_once=not fsdp)
    check_disk(
        out,
        checkpoint_bytes(state_bytes, trained_bytes, trained_params, zero=zero),
        state_bytes,
        replaced=0 < t.save_every < total_steps,
    )
    optimizer = torch.optim.AdamW(
        param_groups([model], t.weight_decay),
        lr=t.lr,
        betas=tuple(t.betas),
        fused=fused_adamw(student, accelerator),
    )
    schedule = functools.partial(
        lr_multiplier,
        total=total_steps,
        warmup=t.warmup_steps,
        schedule=t.schedule,
        min_ratio=t.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    distributed.wrap_policy(accelerator, model)
    engine_steps = distributed.steps_in_engine(accelerator)  # DeepSpeed: its engine steps
    if engine_steps:  # DeepSpeed regroups the parameters: the schedule sets their lr (set_lr)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def set_lr(step: int) -> None:
        """The lr of optimizer step ``step`` in every group (every group starts at train.lr)."""
        for group in optimizer.param_groups:
            group["lr"] = t.lr * schedule(step)

    distributed.prepare_student(model)  # the LM head whole where the losses read it

    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "seconds": 0.0,  # training wall time over every resumed part of the run
        "position": {"epoch": 0, "batch": 0},
    }
    ckpt = find_checkpoint(out) if t.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = {"seconds": 0.0, **json.loads((ckpt / "state.json").read_text())}
        if main:
            print(f"resuming from {ckpt} at step {state['step']}/{total_steps}")
    # A resumed run's optimizer holds the old run's lr; with another horizon (train.max_steps) it
    # takes its next step at this run's schedule (and DeepSpeed's regrouped parameters get theirs).
    set_lr(state["step"])
    pad_id = pad_token_id(tokenizer)
    batches = batch_stream(
        accelerator,
        train_examples,
        batch_size=t.batch_size,
        seed=t.seed,
        pad_id=pad_id,
        position=state["position"],
    )
    eval_batches = None
    if eval_examples:
        eval_batches = fixed_batches(
            eval_examples,
            batch_size=t.batch_size,
            pad_id=pad_id,
            device=accelerator.device,
            limit=t.eval_batches,
        )
    amp_dtype = autocast_dtype(t.precision, accelerator.device.type)

    shared_vocabulary = method.shared_vocabulary
    byte_table = token_byte_lengths(tokenizer)

    def run_eval() -> dict[str, float]:
        metrics = {}
        with distributed.whole(model):  # every process evaluates the same batches
            if not method.info.encoder:  # the language-model metrics (an encoder has no LM head)
                metrics = evaluate(
                    model,
                    eval_batches,
                    teacher=eval_teacher if shared_vocabulary else None,
                    byte_lengths=byte_table,
                    vocab_size=vocab_size,
                    autocast_dtype=amp_dtype,
                )
            # the method's own (e.g. on-policy: reverse KL on the student's own samples)
            metrics.update(method.evaluate(unwrap(model), eval_teacher, eval_batches, tokenizer))
        distributed.release(eval_teacher)
        return {f"eval/{k}": v for k, v in metrics.items()}

    log = MetricsLog(out, enabled=main, resume_step=state["step"])
    if main:
        print(precision_note(t.precision, accelerator.device.type))
        if accelerator.num_processes > 1:
            held = "sharded" if distributed.is_sharded_model(teacher) else "a copy per process"
            print(
                f"engine: {distributed.engine(accelerator)}, {accelerator.num_processes} "
                f"processes; teacher: {held if teacher is not None else 'none'}"
            )
        if not method.info.encoder:  # encoders attend both ways over padded batches
            print(
                "forward passes: padding-free (real tokens only, attention per document)"
                if t.padding_free
                else "forward passes: padded batches (train.padding_free=false)"
            )
        print(method.describe())  # which loss path runs, among other things
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=total_steps, initial=state["step"], desc=f"train {method.name}", disable=not main
    )
    run_tokens, run_time, last_eval = 0, 0.0, None
    window_time, window_sequence_time = 0.0, 0.0  # since the last log row
    in_update = False
    # What the step under way began with (data position, RNG states): an interrupt inside it
    # saves these, so the resumed run draws the step's batches again. None between steps.
    step_start: tuple[dict, dict] | None = None

    def global_index(i: int) -> int:
        """Micro-batch ``i`` of this process's step, counted over all processes: process p's i-th
        is the global batch i·N + p, as in one process with N× grad_accum."""
        return i * accelerator.num_processes + accelerator.process_index

    try:
        while state["step"] < total_steps:
            t0 = time.perf_counter()
            step_start = (dict(state["position"]), rng_states())
            # 1) this step's micro-batches and its global count of supervised tokens
            micro = [next(batches) for _ in range(t.grad_accum)]
            t_seq = time.perf_counter()
            # a sampling method's processes decode different numbers of tokens: no collective
            # may run per forward (FSDP2 and ZeRO-3 gather the student whole for it)
            with distributed.whole(model) if method.info.samples else contextlib.nullcontext():
                micro = [
                    method.sequences(
                        b,
                        student=unwrap(model),
                        teacher=teacher,
                        tokenizer=tokenizer,
                        step=state["step"],
                        index=global_index(i),
                    )
                    for i, b in enumerate(micro)
                ]
            window_sequence_time += time.perf_counter() - t_seq
            # a guard judges the sequences just written; its flag rides the count's reduction, so
            # every process learns whether any asked to stop (after this step) without a collective
            stop = method.stop_reason()
            counts = torch.stack(
                [
                    sum(method.count_tokens(b) for b in micro),  # supervised
                    sum(b["attention_mask"].sum() for b in micro),  # all input tokens
                    torch.tensor(float(stop is not None)),  # processes whose guard asks to stop
                ]
            ).to(accelerator.device, torch.float64)
            global_valid, step_tokens, stops = accelerator.reduce(counts, reduction="sum")
            normalizer = step_normalizer(global_valid, accelerator.num_processes)
            step_tokens = int(step_tokens)
            # 2) forward / backward
            loss_total = torch.zeros((), device=accelerator.device)
            terms_total: dict[str, Tensor] = {}
            for i, b in enumerate(micro):
                # dropout masks from (seed, step, the micro-batch's index over all processes):
                # a run draws the same ones however its batches are split between processes
                key = f"{t.seed}:{state['step']}:{global_index(i)}:dropout"
                torch.manual_seed(random.Random(key).getrandbits(62))
                with torch.autocast(
                    accelerator.device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                ):
                    loss, terms = normalise(method.loss(model, teacher, b), normalizer)
                distributed.backward(accelerator, model, loss, last=i == len(micro) - 1)
                distributed.release(teacher)
                loss_total += loss.detach()
                for k, v in terms.items():
                    terms_total[k] = terms_total.get(k, 0.0) + v
            if accelerator.num_processes > 1:  # the step's figures over all processes, so that
                # every process logs them and stops on a non-finite one together: each process's
                # loss is its share of the sum times N (see step_normalizer), so the mean
                names = list(terms_total)
                packed = torch.stack([loss_total, *(terms_total[k] for k in names)])
                loss_total, *values = accelerator.reduce(packed, reduction="mean")
                terms_total = dict(zip(names, values, strict=True))
            # 3) refuse non-finite values before they touch the weights (DeepSpeed steps here,
            # skipping the update itself where the gradient norm is not finite)
            if engine_steps:
                in_update = True
                grad_norm = distributed.engine_step(model)
                set_lr(state["step"] + 1)
                in_update = False
            else:
                grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            loss_value = loss_total.item()  # host sync: once per step, needed for the NaN guard
            if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                raise NonFiniteLoss(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step "
                    f"{state['step'] + 1}; stopped before the update. The last good checkpoint "
                    f"({find_checkpoint(out) or 'none yet'}) is untouched. Try a lower train.lr, "
                    "train.precision=fp32, or check the data."
                )
            # 4) update
            if not engine_steps:
                in_update = True
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                in_update = False
            state["step"] += 1
            step_start = None
            state["tokens"] += step_tokens
            run_tokens += step_tokens
            step_time = time.perf_counter() - t0
            run_time += step_time
            state["seconds"] += step_time
            window_time += step_time
            step = state["step"]
            # 5) log / evaluate / checkpoint
            tokens_per_s = run_tokens / max(run_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if step % t.log_every == 0 or step == total_steps or step == 1:
                row = {
                    "step": step,
                    "loss": loss_value,
                    **{k: float(v) for k, v in terms_total.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "tokens": state["tokens"],
                    "tokens_per_s": tokens_per_s,
                    "train_seconds": state["seconds"],
                }
                row.update(method.pop_stats())  # the method's own statistics since the last row
                row["sequence_time_share"] = window_sequence_time / max(window_time, 1e-9)
                window_time, window_sequence_time = 0.0, 0.0
                log.log(row)
                if on_log:
                    on_log(row)
            if stops:  # a guard asked: stop before evaluating or saving
                raise stopped(stop, step, out)
            if eval_batches and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                last_eval = run_eval()
                log.log({"step": step, "tokens": state["tokens"], **last_eval})
            if t.save_every and step % t.save_every == 0 and step < total_steps:
                save_checkpoint(accelerator, out, state)
    except KeyboardInterrupt:
        if not in_update:  # weights and optimizer are consistent outside the update
            if step_start is not None:  # inside a step: save the state it began with
                state["position"], rng = step_start
                set_rng_states(rng)
            save_checkpoint(accelerator, out, state)
            if main:
                print(
                    f"\ninterrupted at step {state['step']}: checkpoint saved; run again to resume"
                )
        raise
    except BaseException:  # the log's files are closed before anyone removes the folder
        log.close()
        raise
    finally:
        bar.close()
    if eval_batches:
        last_eval = run_eval()
    # the most any process held through training and the final evaluation (`potstill plan`)
    peak = peak_memory_bytes(accelerator.device.type)
    if peak is not None:
        peak = int(accelerator.reduce(torch.tensor(float(peak), device=accelerator.device), "max"))
    last_row = {**(last_eval or {}), **({"peak_memory_mb": peak / 2**20} if peak else {})}
    if last_row:
        log.log(
            {
                "step": state["step"],
                "tokens": state["tokens"],
                "train_seconds": state["seconds"],
                **last_row,
            }
        )
    save_checkpoint(accelerator, out, state)
    model_dir = None
    if t.save_model:
        gathered = distributed.full_state_dict(accelerator, model)  # None: whole everywhere
        own = {name: m.state_dict() for name, m in named_extras.items()}
        if gathered is not None and named_extras:
            gathered, own = split_state_dict(gathered, list(named_extras))
        model_dir = save_model(
            accelerator, model, tokenizer, out / "model", recipe.student, gathered
        )
    if t.save_model and main:
        method.finish(model_dir)
        for name, state_dict in own.items():  # beside the student, never inside
            tmp = out / f"{name}.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
            os.replace(tmp, out / f"{name}.safetensors")
    history = log.rows
    log.close()
    return TrainResult(
        output_dir=out,
        model_dir=model_dir,
        steps=state["step"],
        tokens=state["tokens"],
        seconds=run_time,
        history=history,
        eval={k.removeprefix("eval/"): v for k, v in last_eval.items()} if last_eval else None,
        peak_memory_bytes=peak,
    )
