"""Several processes: which engine a run is under, and the few things the loop does for one.

potstill brings no parallel engine of its own: Accelerate launches the processes and wraps the
student in PyTorch's DDP or FSDP2, or in DeepSpeed's engine (ZeRO stage 1, 2 or 3). What this
module adds is what distillation needs on top (docs/distributed.md):

- :func:`make_accelerator` — the Accelerator of a run, refusing a launch that would silently train
  N independent copies, and running FSDP2 and DeepSpeed on CPUs (gloo), where Accelerate itself
  only runs DDP; :func:`configure_deepspeed` hands DeepSpeed the run's batch, accumulation and
  clipping;
- :func:`prepare_student` — the losses read the LM head outside the forward (a chunk of rows at a
  time), so the head stays whole where they read it: under FSDP2 the units holding it stay gathered
  from the forward to the backward; under ZeRO-3 it is a persistent parameter (DeepSpeed's own
  mechanism for small parameters: whole on every process, its gradient partitioned like any other);
- :func:`backward` and :func:`engine_step` — under DeepSpeed its engine runs the backward and takes
  the step (it clips, and skips a step whose gradient norm is not finite);
- :func:`shard_teacher` — the frozen teacher sharded too (FSDP2, or ZeRO-3 without an optimizer;
  no optimizer state, no gradients), and :func:`release` to free its gathered root after each
  micro-batch;
- :func:`whole` — a model gathered for generation (on-policy sampling, held-out sampling):
  processes draw different numbers of tokens, so no per-forward collective may run;
- :func:`full_state_dict` — every process takes part in gathering the weights to save.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from potstill.errors import RecipeError
from potstill.lm import unwrap

if TYPE_CHECKING:
    from accelerate import Accelerator


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator() -> Accelerator:
    """The run's Accelerator.

    - On a machine without a GPU (or other accelerator), a launch of several processes runs on the
      CPU with gloo: Accelerate does this only when told ``--cpu`` (which starts one process), so
      a plain ``accelerate launch --multi_gpu --num_processes 2`` would otherwise start two
      processes that each train the whole run alone.
    - An FSDP launch (``ACCELERATE_USE_FSDP``) on CPUs: Accelerate keeps FSDP for accelerators, but
      PyTorch's FSDP2 runs on gloo; the run gets Accelerate's FSDP state and plugin (read from
      the launch config) all the same.
    - A DeepSpeed launch on CPUs: its process group is made with gloo (else Accelerate counts one
      process while DeepSpeed counts them all, and DeepSpeed's batch check fails).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
    )

    launched = launched_processes()
    cpu = launched > 1 and not torch.accelerator.is_available()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if deepspeed:
        _import_deepspeed()
        if cpu:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # step_scheduler_with_optimizer=False: the schedule counts optimizer steps (Accelerate would
    # step it once per process otherwise)
    accelerator = Accelerator(
        cpu=cpu and not deepspeed, step_scheduler_with_optimizer=False, kwargs_handlers=handlers
    )
    if deepspeed:
        # Accelerate's DeepSpeed config tells transformers that ZeRO-3 is on, and transformers
        # then loads every later model straight into partitions and makes generate() step all
        # processes together: potstill loads its models whole before the engine starts
        # (zero3_init_flag: false) and gathers the student for sampling (whole())
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    state = accelerator.state
    if cpu and fsdp and state.distributed_type == DistributedType.MULTI_CPU:
        # both of Accelerate's shared states: an AcceleratorState() made later copies PartialState's
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    if state.distributed_type == DistributedType.FSDP:
        # a fresh plugin (from the launch's FSDP_* settings) per run: the wrap policy it learns
        # from one model (its block class) must not carry over to the next run in this process
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if launched > 1 and accelerator.num_processes != launched:
        raise RecipeError(
            f"{launched} processes were launched but each runs alone (Accelerate sees "
            f"{accelerator.num_processes}): they would train {launched} copies of the run into "
            "one output directory. Launch with a config from configs/accelerate/ "
            "(accelerate launch --config_file configs/accelerate/ddp.yaml ...)"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise RecipeError(
            "FSDP1 is not supported: set fsdp_version: 2 in the launch config "
            "(configs/accelerate/fsdp2.yaml)"
        )
    return accelerator


def _import_deepspeed() -> None:
    """DeepSpeed, or an error naming the extra; its INFO lines (one per step and setting) are
    left out of the run's output."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise RecipeError(
            "a DeepSpeed launch needs the deepspeed package: pip install --no-build-isolation "
            "'potstill[deepspeed]' (or launch configs/accelerate/fsdp2.yaml, which shards the "
            "same three things)"
        ) from e
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed's collectives call torch.distributed's older names, one warning per call
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning, "torch.distributed"
    )


def configure_deepspeed(
    accelerator: Accelerator, *, batch_size: int, grad_accum: int, max_grad_norm: float | None
) -> None:
    """Before ``accelerator.prepare`` under DeepSpeed: the run's micro-batch, accumulation and
    clipping in DeepSpeed's config (its ``auto`` values are filled from a data loader potstill
    does not hand it), and the whole weights gathered for saving under ZeRO-3. A config that turns
    on DeepSpeed's fp16/bf16 is refused: potstill casts by ``train.precision`` itself."""
    if not steps_in_engine(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for precision in ("fp16", "bf16"):
        if (config.get(precision) or {}).get("enabled") in (True, "true"):
            raise RecipeError(
                f"the DeepSpeed config turns on {precision}: potstill applies train.precision "
                "itself (autocast, fp32 weights and AdamW states); set mixed_precision: 'no' "
                "in the launch config and train.precision=bf16 in the recipe instead"
            )
    config.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=batch_size * grad_accum * accelerator.num_processes,
        gradient_clipping=float(max_grad_norm or 0.0),
        steps_per_print=2**62,
    )
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    accelerator.gradient_accumulation_steps = grad_accum  # what Accelerate checks DeepSpeed's by


def deepspeed_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def engine(accelerator: Accelerator) -> str:
    """The engine in words: ``one process``, ``DDP (backend)``, ``FSDP2``, ``DeepSpeed ZeRO-N``
    (FSDP1 is refused by :func:`make_accelerator`)."""
    stage = deepspeed_stage(accelerator)
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    if is_sharded(accelerator):
        return "FSDP2"
    if accelerator.num_processes > 1:
        return f"DDP ({accelerator.state.backend})"
    return "one process"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run's engine shards the model's weights (FSDP2, ZeRO-3)."""
    return _is_fsdp_run(accelerator) or deepspeed_stage(accelerator) == 3


def _is_fsdp_run(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def wrap_policy(accelerator: Accelerator, model: nn.Module) -> None:
    """Before ``accelerator.prepare`` under FSDP2: the units are the model's blocks
    (``_no_split_modules``) except one holding the input embeddings (BERT's ``BertEmbeddings``),
    which Accelerate shards on its own after the blocks (twice would fail). A launch config that
    names its classes (``fsdp_transformer_layer_cls_to_wrap``) is left as it is."""
    if not _is_fsdp_run(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap:
        return
    inner = unwrap(model)
    embedding = getattr(inner, "get_input_embeddings", lambda: None)()
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    plugin.transformer_cls_names_to_wrap = sorted(
        name
        for name in blocks
        if not any(
            type(m).__name__ == name and embedding in list(m.modules()) for m in inner.modules()
        )
    )


def prepare_student(model: nn.Module) -> None:
    """After ``accelerator.prepare`` (``model`` as it returned it), so that the losses, which read
    the LM head after the forward, see the whole matrix:

    - FSDP2: the units that hold an LM head's weight (the root, or the head's and a tied
      embedding's own units, as Accelerate's wrap policy makes them) stay gathered from their
      forward to their backward; a launch config's ``reshard_after_forward`` applies to the rest.
      Backward reshards them and reduce-scatters the head's gradient like any other.
    - ZeRO-3: the head's weight (and bias) are persistent parameters, as DeepSpeed keeps those
      under ``stage3_param_persistence_threshold``: whole on every process between steps, their
      gradients reduce-scattered and their update gathered back after each step."""
    if is_fsdp(model):
        for unit in _head_units(model):
            unit.set_reshard_after_forward(False, recurse=False)
    elif _zero3(model) is not None:
        _persist_heads(_zero3(model), model.module)


def _head_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units that may hold the LM head's weight: those whose subtree holds it and no
    sub-unit of theirs does (with tied weights, the embedding's and the head's)."""
    heads = []
    inner = unwrap(model)
    for get in ("get_output_embeddings", "get_input_embeddings"):
        module = getattr(inner, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            heads.append(module.weight)
    units = _units(model)
    holding = [u for u in units if any(p is w for p in u.parameters() for w in heads)]
    return [u for u in holding if not any(v is not u and v in holding for v in u.modules())]


def _zero3(model: nn.Module) -> Any | None:
    """The ZeRO-3 parameter coordinator (``DeepSpeedZeRoOffload``) of a DeepSpeed engine whose
    weights are partitioned, else None."""
    if not getattr(model, "zero_optimization_partition_weights", lambda: False)():
        return None
    return getattr(model.optimizer, "parameter_offload", model.optimizer)


def _heads(model: nn.Module) -> list[nn.Parameter]:
    """The LM head's parameters (weight, bias; a tied embedding shares the weight); none for an
    encoder."""
    head = getattr(unwrap(model), "get_output_embeddings", lambda: None)()
    return [] if head is None else list(head.parameters(recurse=False))


def _persist_heads(offload: Any, model: nn.Module) -> None:
    heads = _heads(model)
    if not heads:
        return
    for p in heads:
        # persistent: whole between steps (the step partitions it, then gathers it back);
        # external: module hooks never release it (a first, trace-recording forward would)
        p.ds_persist = p.is_external_param = True
        if not any(p is q for q in offload.persistent_parameters):
            offload.persistent_parameters.append(p)  # gathered again after each optimizer step
    heads[0].all_gather(param_list=heads)


def shard_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """Shard the frozen teacher like the student, so each process holds 1/N of it: under FSDP2
    one unit per decoder layer, then the root; under ZeRO-3 a DeepSpeed engine without an
    optimizer (ZeRO's inference mode) with its LM head kept whole (see :func:`prepare_student`).
    Else return it as it is (each process its own copy)."""
    if not is_sharded(accelerator) or is_sharded_model(teacher):
        return teacher
    if deepspeed_stage(accelerator) == 3:
        import deepspeed

        config = accelerator.state.deepspeed_plugin.deepspeed_config
        engine, *_ = deepspeed.initialize(
            model=teacher,
            config={
                "train_micro_batch_size_per_gpu": 1,
                "steps_per_print": 2**62,
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": config["zero_optimization"].get(
                        "stage3_param_persistence_threshold", 0
                    ),
                },
            },
        )
        _persist_heads(_zero3(engine), teacher)
        # the engine lives as long as the teacher (its hooks act on the teacher module; the
        # engine removes them when collected); outside nn.Module's registry of submodules
        object.__setattr__(teacher, "_potstill_deepspeed_engine", engine)
        return teacher
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in teacher.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(teacher, reshard_after_forward=False)  # its root stays gathered for the loss
    return teacher


def is_sharded_model(model: nn.Module | None) -> bool:
    """Whether ``model``'s weights are sharded over the processes (FSDP2, ZeRO-3)."""
    if model is None:
        return False
    return is_fsdp(model) or any(hasattr(p, "ds_id") for p in model.parameters())


def release(model: nn.Module | None) -> None:
    """Free what an FSDP2 model still holds gathered (a teacher's root after its forward; no
    backward will do it). A no-op for any other model."""
    if model is not None and is_fsdp(model):
        for unit in _units(model):
            unit.reshard()


@contextmanager
def whole(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (as ``accelerator.prepare`` returned it) with every weight gathered and kept so
    for the block: forward passes inside it run no collective, so processes may decode different
    numbers of tokens. Costs the whole model's memory on each process for the block (as TRL's
    generation gathers do). Under FSDP2 every unit is unsharded; under ZeRO-3 every partitioned
    parameter is gathered and DeepSpeed's module hooks (which would fetch and release per forward)
    are taken off for the block. A no-op for any other model."""
    offload = _zero3(model)
    if offload is not None:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # those not whole now (the LM head is, and so may be DeepSpeed's persistent parameters)
        missing = [p for p in model.module.parameters() if p.ds_status != ZeroParamStatus.AVAILABLE]
        with deepspeed.zero.GatheredParameters(missing):
            offload._remove_module_hooks()
            try:
                yield model
            finally:
                offload.forward_hooks, offload.backward_hooks = [], []
                offload.setup_zero_stage3_hooks()
        return
    if not is_fsdp(model):
        yield model
        return
    model.set_reshard_after_forward(False)
    for unit in _units(model):
        unit.unshard()
    try:
        yield model
    finally:
        for unit in _units(model):
            unit.reshard()
        model.set_reshard_after_forward(True)
        prepare_student(model)


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole weights for saving: None where the model is whole on every process (one
    process, DDP, ZeRO-1/2: save it as it is); under FSDP2 and ZeRO-3 every process must call
    this (it gathers), and the main process gets the weights."""
    return accelerator.get_state_dict(model) if is_sharded(accelerator) else None


def backward(accelerator: Accelerator, model: nn.Module, loss: Tensor, *, last: bool) -> None:
    """Backward of one micro-batch's loss (already normalised once for the whole step). Under
    DeepSpeed its engine runs it, told whether this is the step's last micro-batch and not to
    divide the loss by its accumulation count again; :func:`engine_step` then takes the step."""
    if not steps_in_engine(accelerator):
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(last)
    model.backward(loss, scale_wrt_gas=False)


def steps_in_engine(accelerator: Accelerator) -> bool:
    """Whether the engine takes the optimizer step itself (DeepSpeed: :func:`engine_step`)."""
    return deepspeed_stage(accelerator) is not None


def engine_step(model: nn.Module) -> float:
    """DeepSpeed's step after the last micro-batch: it clips to ``gradient_clipping``, skips the
    update when the gradient norm is not finite, else steps AdamW (the loop sets the lr). Returns
    the gradient norm before clipping (inf where the step was skipped)."""
    model.step()
    norm = model.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def check_student(accelerator: Accelerator, transformed: bool) -> None:
    """Refuse what is not supported where the weights are sharded (FSDP2, ZeRO-3) yet: LoRA and
    QAT students (they run in one process, under DDP and under ZeRO-1/2)."""
    if is_sharded(accelerator) and transformed:
        raise RecipeError(
            f"student.lora and student.qat run under DDP and ZeRO-2, not yet under "
            f"{engine(accelerator)}: launch with configs/accelerate/ddp.yaml or zero2.yaml"
        )
