"""``potstill plan``: what a recipe's run needs before it starts — memory per process, disk for
its checkpoints and teacher cache, time — and which knob to turn when it does not fit.

Everything is computed from configs (models built on the ``meta`` device: no weights are read),
a sample of the training data, and the recipe. Memory per process, in bytes:

- **runtime**: on a CPU the resident memory of this very process once torch and transformers are
  imported (what every run carries before its first tensor); on a GPU the CUDA context (~0.5 GiB);
  CPU processes of a launch add 84 MiB for gloo (measured);
- **student weights, gradients, AdamW states**: fp32 (4 + 4 + 8 bytes per trained parameter;
  frozen ones only their weight); DDP adds its gradient buckets (one more copy of the
  gradients); FSDP2 divides all three by the processes and adds what it gathers at a time (the
  embedding / head units, kept whole from forward to backward for the losses, and two decoder
  layers in flight);
- **teacher**: its weights in ``teacher.dtype`` (FSDP2: sharded, plus its gathered root); nothing
  when the signal is a cache or a server;
- **activations**: what backward keeps of the student's forward, per token and layer
  ``6·H + 2·H_kv + 4·I`` fp32 values (a Llama-style block with SDPA: the norms' inputs, q/k/v and
  the attention output, the MLP's gate, up, activation and product), times the tokens of the
  largest micro-batch (``batch_size × max_length`` packed, else the longest sampled record),
  halved under bf16 autocast; plus both models' final hidden states;
- **loss buffers**: the fused loss's two ``[chunk, V]`` fp32 blocks and its ``[V, H]`` head
  gradient accumulator.

Time is FLOPs over a FLOP rate: ``6·N_student + 2·N_teacher`` per token (parameters that multiply,
the head included) at the rate of fp32 matmuls measured here, or ``--tflops`` stated per device.

Disk: a checkpoint holds the student's fp32 weights and AdamW's two moments per trained parameter
(DeepSpeed: its fp32 copy and moments instead, 12 bytes per trained parameter, and under ZeRO-3
no other copy of the weights; FSDP2's distributed checkpoint stores tied embeddings twice), and a
run's folder holds two while a new one replaces the last (:func:`potstill.train.checkpoint_bytes`,
the figure ``potstill train`` checks the free space against before its first step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from potstill.errors import RecipeError
from potstill.models import count_parameters
from potstill.recipe import Recipe
from potstill.utils import (
    autocast_dtype,
    default_device_type,
    human_bytes,
    process_status_bytes,
)

GiB = 2**30
PHASES = ("held", "train", "eval", "load")
CUDA_CONTEXT = 0.5 * GiB  # what a process's CUDA context takes before any tensor (typical)
GLOO = 84 * 2**20  # what a CPU process's gloo group adds once it communicates (measured here)


@dataclass
class Line:
    name: str
    bytes: float
    note: str = ""
    # "held" all run | "train" (a step's work) | "eval" (a held-out batch) | "load" (at start)
    phase: str = "held"


@dataclass
class Plan:
    recipe: str
    method: str
    engine: str  # "one process", "DDP", "FSDP2", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"
    processes: int
    device: str  # "cpu" or "gpu"
    lines: list[Line] = field(default_factory=list)
    capacity: float | None = None  # bytes per process, when stated
    student_params: int = 0
    teacher_params: int = 0
    tokens: int = 0  # the run's input tokens (all processes)
    flops: float = 0.0
    flop_rate: float = 0.0  # per process, FLOP/s
    rate_source: str = ""
    cache_bytes: float | None = None
    checkpoint_bytes: float = 0.0  # one checkpoint of the run (all processes' parts)
    knobs: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The peak: what is held all run plus the larger of a training step's and a held-out
        batch's work (they never overlap), or loading (the runtime and the models being built),
        whichever is more."""
        phase = {k: sum(x.bytes for x in self.lines if x.phase == k) for k in PHASES}
        steady = phase["held"] + max(phase["train"], phase["eval"])
        return max(steady, self.lines[0].bytes + phase["load"])

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    @property
    def seconds(self) -> float:
        """GPUs add up their rates; CPU processes share one machine's cores."""
        devices = self.processes if self.device == "gpu" else 1
        return self.flops / max(self.flop_rate * devices, 1.0)

    def table(self) -> str:
        where = (
            f"{self.processes} {self.device.upper()} process{'es' if self.processes > 1 else ''}"
        )
        engine = f" under {self.engine}" if self.processes > 1 else ""
        out = [f"plan: {self.recipe} — {self.method}, {where}{engine}", ""]
        out.append("memory per process:")
        for line in self.lines:
            when = {"train": " (a step)", "eval": " (held-out)", "load": " (at start)"}
            when = when.get(line.phase, "")
            out.append(f"  {line.name + when:<24} {human_bytes(line.bytes):>10}  {line.note}")
        out.append(
            f"  {'total':<24} {human_bytes(self.total):>10}  peak: held all run + the larger of "
            "a step and a held-out batch, or loading"
        )
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  {verdict} in {human_bytes(self.capacity)} per process")
        out.append("")
        out.append(
            f"models: student {self.student_params / 1e6:.1f}M parameters, teacher "
            + (f"{self.teacher_params / 1e6:.1f}M" if self.teacher_params else "none in memory")
        )
        out.append(
            f"time: {self.tokens:,} tokens, {self.flops / 1e12:.2f} TFLOP ≈ {_duration(self.seconds)}"
            f" at {self.flop_rate / 1e9:.1f} GFLOP/s per {self.device.upper()} ({self.rate_source})"
        )
        out.append(
            f"run folder: ≈ {human_bytes(2 * self.checkpoint_bytes)} on disk at most (a "
            f"checkpoint of ≈ {human_bytes(self.checkpoint_bytes)} is written whole beside the "
            "last before it replaces it)"
        )
        if self.cache_bytes is not None:
            out.append(f"teacher cache: ≈ {human_bytes(self.cache_bytes)} on disk")
        if self.knobs:
            out.append("")
            out.append("to fit, in order of what they save here:")
            out.extend(f"  - {k}" for k in self.knobs)
        return "\n".join(out)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------- models on meta


def _meta_model(config: Any, encoder: bool) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        return (AutoModel if encoder else AutoModelForCausalLM).from_config(config)


def _models(r: Recipe, encoder: bool) -> tuple[nn.Module, nn.Module | None]:
    """(student, teacher or None) on the meta device, shaped as the run would build them."""
    from potstill.models import _student_config, load_config, prune_layers

    teacher_config = None
    if r.teacher.model:
        teacher_config = load_config(r.teacher.model, trust_remote_code=r.teacher.trust_remote_code)
    if r.student.init == "pretrained":
        student_config = load_config(
            r.student.model or r.teacher.model, trust_remote_code=r.student.trust_remote_code
        )
        student = _meta_model(student_config, encoder)
    elif r.student.init == "prune":
        student = prune_layers(_meta_model(teacher_config, encoder), list(r.student.keep_layers))
    else:  # config
        student = _meta_model(_student_config(teacher_config, r.student.config_overrides), encoder)
    teacher = _meta_model(teacher_config, encoder) if teacher_config is not None else None
    return student, teacher


def _lora_params(model: nn.Module, r: int, targets: list[str]) -> int:
    """Adapter parameters of rank ``r`` on the linear layers named ``targets``."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += r * (module.in_features + module.out_features)
    return total


def _block_shape(model: nn.Module) -> tuple[int, int, int, int, int]:
    """(layers, hidden, kv width, intermediate, vocab) from the model's config."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = c.hidden_size
    heads = getattr(c, "num_attention_heads", 1)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    return c.num_hidden_layers, hidden, kv * head_dim, inter, c.vocab_size


def _largest_block(model: nn.Module) -> int:
    """Parameters of the largest decoder (or encoder) layer."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    sizes = [count_parameters(m) for m in model.modules() if type(m).__name__ in blocks]
    return max(sizes, default=0)


# ----------------------------------------------------------------------------- data


@dataclass
class DataShape:
    records: int
    mean_tokens: float  # per example
    longest: int  # tokens of the longest sampled example
    supervised: float  # supervised tokens per example (mean)


def _data_shape(r: Recipe, tokenizer: Any, sample: int = 256) -> DataShape:
    """The training data's shape, from a sample of its first ``sample`` records."""
    from potstill.data import load_records, tokenize_records

    records = load_records(r.data.train, split=r.data.train_split, limit=r.data.max_train_records)
    examples, _ = tokenize_records(records[:sample], tokenizer, max_length=r.data.max_length)
    if not examples:
        raise RecipeError(
            f"data.train {r.data.train}: no example to learn from in its first records"
        )
    lengths = [len(e.input_ids) for e in examples]
    supervised = [sum(e.target_mask[1:]) for e in examples]  # targets with a token before
    return DataShape(
        len(records), sum(lengths) / len(lengths), max(lengths), sum(supervised) / len(supervised)
    )


# ----------------------------------------------------------------------------- rates


def measured_flop_rate(seconds: float = 0.5) -> float:
    """FLOP/s of fp32 1024³ matmuls on this CPU's threads (the best of a few)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def runtime_bytes(device: str, method: str, with_deepspeed: bool = False) -> float:
    """What a process holds before its first tensor: here, this process's resident memory once it
    has imported what a run of ``method`` imports (and read the data sample; DeepSpeed where the
    engine is DeepSpeed's); on a GPU, the CUDA context."""
    if device == "gpu":
        return CUDA_CONTEXT
    import potstill.train  # noqa: F401  (the loop, Accelerate, TensorBoard, the evaluation)
    from potstill.methods.registry import method_class

    method_class(method)
    if with_deepspeed:
        import deepspeed  # noqa: F401
    return float(process_status_bytes("VmRSS") or 0)


ENGINES = {"ddp": "DDP", "fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}


# ----------------------------------------------------------------------------- the plan


def make_plan(
    r: Recipe,
    *,
    recipe_path: str = "recipe",
    processes: int = 1,
    engine: str = "ddp",
    device: str | None = None,
    memory_gb: float | None = None,
    tflops: float | None = None,
) -> Plan:
    """The plan of recipe ``r`` on ``processes`` processes (``engine``: one of :data:`ENGINES`)."""
    from potstill.losses.fused import auto_chunk_size
    from potstill.methods.registry import method_info
    from potstill.models import load_tokenizer
    from potstill.train import checkpoint_bytes, steps_for

    if engine not in ENGINES:
        raise RecipeError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
    info = method_info(r.method)
    device = device or ("gpu" if default_device_type() == "cuda" else "cpu")
    n = max(1, processes)
    sharded = engine in ("fsdp2", "zero3") and n > 1  # the weights, 1/N per process
    states_sharded = sharded or (engine == "zero2" and n > 1)  # gradients and AdamW states
    ddp = n > 1 and engine == "ddp"
    name = "one process" if n == 1 else ENGINES[engine]
    plan = Plan(recipe_path, r.method, name, n, device)
    plan.capacity = memory_gb * GiB if memory_gb else None

    student, teacher = _models(r, info.encoder)
    live_teacher = info.needs_teacher and r.teacher.source == "live" and teacher is not None
    teacher_params = count_parameters(teacher) if teacher is not None else 0
    t_bytes = getattr(torch, r.teacher.dtype).itemsize
    plan.student_params = count_parameters(student)
    plan.teacher_params = teacher_params if live_teacher else 0
    trained = plan.student_params
    if r.student.lora.r:
        trained = _lora_params(student, r.student.lora.r, list(r.student.lora.target_modules))
    layers, hidden, kv, inter, vocab = _block_shape(student)

    tokenizer = load_tokenizer(r.student.model or r.teacher.model)
    data = _data_shape(r, tokenizer)
    mean_tokens = data.mean_tokens
    t = r.train
    rows = t.batch_size * (r.data.max_length if r.data.packing else data.longest)  # largest batch
    per_step = t.batch_size * t.grad_accum * n
    steps = steps_for(r, data.records, mean_tokens, n)
    plan.tokens = int(steps * per_step * (r.data.max_length if r.data.packing else mean_tokens))

    # --- memory per process
    f32 = 4
    share = 1 / n if sharded else 1.0
    plan.lines.append(
        Line(
            "runtime",
            runtime_bytes(device, r.method, engine.startswith("zero")),
            "what a run imports, the data",
        )
    )
    if device == "cpu" and n > 1:  # measured: a tiny model's first step under 2-process DDP on
        # gloo took 84 MiB more than in one process (409 -> 493 MiB peak), whatever the model
        plan.lines.append(Line("process group", GLOO, "gloo's buffers and threads (measured)"))
    gathered = 0.0
    if sharded and engine == "fsdp2":  # the embedding and head units kept whole, two layers in
        # flight
        gathered = (vocab * hidden * (1 if student.config.tie_word_embeddings else 2)) * f32
        gathered += 2 * _largest_block(student) * f32
    elif sharded:  # ZeRO-3 prefetches and keeps up to stage3_max_live_parameters gathered
        gathered = (_live(plan.student_params) - plan.student_params * share) * f32
    # DeepSpeed's optimizer steps an fp32 copy of each process's partition (even of fp32 weights)
    copy = trained * f32 / n if engine.startswith("zero") and n > 1 else 0.0
    plan.lines.append(
        Line(
            "student weights",
            plan.student_params * f32 * share + gathered + copy,
            f"{plan.student_params / 1e6:.1f}M fp32"
            + (f", 1/{n} each + {human_bytes(gathered)} gathered" if sharded else "")
            + (f" + DeepSpeed's 1/{n} fp32 copy" if copy else ""),
        )
    )
    state_share = 1 / n if states_sharded else 1.0
    grads = trained * f32 * state_share
    note = f"{trained / 1e6:.1f}M trained" + (f", 1/{n} each" if states_sharded else "")
    if ddp:
        grads, note = 2 * grads, note + " + DDP buckets"
    elif engine == "zero2" and n > 1:  # whole until its reduce bucket (5e8 values) is reduced
        grads, note = grads + trained * f32, note + " + whole ones until reduced"
    plan.lines.append(Line("gradients", grads, note))
    plan.lines.append(Line("AdamW states", 2 * trained * f32 * state_share, "two fp32 moments"))
    if live_teacher:
        _, t_hidden, *_ = _block_shape(teacher)
        root = vocab * t_hidden * t_bytes if sharded else 0.0
        if sharded and engine == "zero3":
            root = (_live(plan.teacher_params) - plan.teacher_params * share) * t_bytes
        plan.lines.append(
            Line(
                "teacher",
                plan.teacher_params * t_bytes * share + root,
                f"{plan.teacher_params / 1e6:.1f}M {r.teacher.dtype}"
                + (", sharded" if sharded else ""),
            )
        )
    else:
        t_hidden = 0
        source = r.teacher.source if info.needs_teacher else "none"
        plan.lines.append(Line("teacher", 0.0, f"not in memory ({source})"))
    act = rows * layers * (6 * hidden + 2 * kv + 4 * inter) * f32
    if device == "gpu":  # planned from anywhere: `auto` is bf16 on the GPUs potstill targets
        bf16 = t.precision in ("auto", "bf16")
    else:
        bf16 = autocast_dtype(t.precision, "cpu") is not None
    if bf16:
        act /= 2
    act += rows * (hidden + t_hidden) * f32  # final hidden states of both models
    plan.lines.append(
        Line(
            "activations",
            act,
            f"{rows:,} tokens in the largest micro-batch × {layers} layers"
            + (", bf16" if bf16 else ", fp32"),
            "train",
        )
    )
    if info.shared_vocabulary and not info.encoder:
        chunk = min(r.loss.chunk_size or auto_chunk_size(vocab), rows)
        buffers = 2 * chunk * vocab * f32 + vocab * hidden * f32
        plan.lines.append(
            Line("loss buffers", buffers, f"chunks of {chunk} rows × {vocab:,}", "train")
        )
        # held-out evaluation (potstill.evaluate): both models' [positions, V] logits at a
        # batch's supervised positions, and forward KL's five temporaries of that size (two
        # log-softmaxes, the teacher's probabilities, their difference and product)
        positions = t.batch_size * data.longest * data.supervised / data.mean_tokens
        evaluation = 7 * positions * vocab * f32 + rows * (hidden + t_hidden) * f32
        plan.lines.append(
            Line("logits", evaluation, f"{positions:,.0f} positions × {vocab:,}, 7 buffers", "eval")
        )

    if r.student.init == "prune" and teacher is not None:  # the teacher, then a deep copy of it
        plan.lines.append(
            Line(
                "loading",
                2 * teacher_params * t_bytes,
                "the teacher and its copy to prune",
                "load",
            )
        )

    # --- time and disk
    head = vocab * hidden
    plan.flops = plan.tokens * (
        6 * (plan.student_params + (head if student.config.tie_word_embeddings else 0))
        + 2 * plan.teacher_params
    )
    if tflops:
        plan.flop_rate, plan.rate_source = tflops * 1e12, "stated"
    else:
        plan.flop_rate = measured_flop_rate()
        plan.rate_source = "fp32 matmuls measured here; real steps reach less"
    adapters = trained if r.student.lora.r else 0  # beside the base weights
    tied = student.config.tie_word_embeddings
    twice = vocab * hidden if tied and engine == "fsdp2" and n > 1 else 0  # FSDP2 saves it twice
    plan.checkpoint_bytes = checkpoint_bytes(
        (plan.student_params + adapters + twice) * f32,
        trained * f32,
        trained,
        zero={"zero2": 2, "zero3": 3}.get(engine) if n > 1 else None,
    )
    if r.teacher.source == "cache" or r.teacher.cache:  # the training split, scored once
        from potstill.teachers.writer import CaptureSettings, max_bytes_per_position

        c = r.cache
        stored = CaptureSettings(c.top_k, c.dtype, c.coverage, c.tail_samples)
        plan.cache_bytes = data.records * data.supervised * max_bytes_per_position(stored, vocab)

    # --- knobs, largest saving first
    if plan.fits is False:
        plan.knobs = _knobs(plan, r, states_sharded, live_teacher, act, bf16)
    return plan


def _live(params: int) -> float:
    """Parameters a ZeRO-3 engine holds gathered while it runs: up to DeepSpeed's default
    ``stage3_max_live_parameters`` (1e9), which its prefetching reaches (measured: the demo
    pair's teacher and student both whole by the second step)."""
    return float(min(params, ZERO3_MAX_LIVE))


ZERO3_MAX_LIVE = 1e9


def _knobs(
    plan: Plan, r: Recipe, sharded: bool, live_teacher: bool, act: float, bf16: bool
) -> list[str]:
    by_name = {line.name: line.bytes for line in plan.lines}
    options = []
    states = by_name["student weights"] + by_name["gradients"] + by_name["AdamW states"]
    if not sharded:
        options.append((states * 0.5, "FSDP2 over more processes (--engine fsdp2 --gpus N): "
                        "shards weights, gradients and AdamW states"))  # fmt: skip
    if live_teacher:
        options.append((by_name["teacher"], "teacher.source=cache (`potstill cache` first): no "
                        "teacher in training memory"))  # fmt: skip
    if not r.student.lora.r:
        options.append((by_name["gradients"] + by_name["AdamW states"], "student.lora.r=16: "
                        "gradients and AdamW states of the adapters only"))  # fmt: skip
    options.append((act * 0.5, f"train.batch_size={max(1, r.train.batch_size // 2)} with "
                    f"train.grad_accum={r.train.grad_accum * 2}: half the activations, same step"))  # fmt: skip
    if not bf16:
        options.append((act * 0.5, "train.precision=bf16: activations in half the bytes"))
    options.append((act * 0.25, f"data.max_length={r.data.max_length // 2}: shorter rows"))
    return [text for saved, text in sorted(options, key=lambda o: -o[0]) if saved > 0]
