"""Several processes: which engine a run is under, and the few things the loop does for one.

potstill brings no parallel engine of its own: Accelerate launches the processes and wraps the
student in PyTorch's DDP or FSDP2 (or DeepSpeed). What this module adds is what distillation needs
on top (docs/distributed.md):

- :func:`make_accelerator` — the Accelerator of a run, refusing a launch that would silently train
  N independent copies, and running FSDP2 on CPUs (gloo), where Accelerate itself only runs DDP;
- :func:`prepare_student` — under FSDP2 the student's root unit (embeddings, final norm, LM head)
  stays gathered from its forward to its backward, so the losses, which read the LM head outside
  the forward (a chunk of rows at a time), see the whole head; its gradient is reduce-scattered
  by FSDP2's own backward hooks like any other;
- :func:`shard_teacher` — the frozen teacher sharded with FSDP2 too (no optimizer state, no
  gradients), and :func:`release` to free its gathered root after each micro-batch;
- :func:`whole` — a model gathered for generation (on-policy sampling, held-out sampling):
  processes draw different numbers of tokens, so no per-forward collective may run;
- :func:`full_state_dict` — every process takes part in gathering the weights to save.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

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
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    launched = launched_processes()
    cpu = launched > 1 and not torch.accelerator.is_available()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise RecipeError(
            "DeepSpeed is not supported yet: under Accelerate its engine steps the optimizer "
            "inside backward (before potstill's non-finite check) and divides the loss by its "
            "own accumulation count (docs/distributed.md). Launch FSDP2, which shards weights, "
            "gradients and optimizer states as ZeRO-3 does: configs/accelerate/fsdp2.yaml"
        )
    # step_scheduler_with_optimizer=False: the schedule counts optimizer steps (Accelerate would
    # step it once per process otherwise)
    accelerator = Accelerator(cpu=cpu, step_scheduler_with_optimizer=False)
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


def engine(accelerator: Accelerator) -> str:
    """The engine in words: ``one process``, ``DDP (backend)``, ``FSDP2`` (DeepSpeed and FSDP1
    are refused by :func:`make_accelerator`)."""
    if is_sharded(accelerator):
        return "FSDP2"
    if accelerator.num_processes > 1:
        return f"DDP ({accelerator.state.backend})"
    return "one process"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run's engine shards the model (FSDP2, the one sharding engine let through)."""
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
    if not is_sharded(accelerator):
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
    """After ``accelerator.prepare``: the FSDP2 units that hold an LM head's weight (the root, or
    the head's and a tied embedding's own units, as Accelerate's wrap policy makes them) stay
    gathered from their forward to their backward, so the losses, which read the head after the
    forward, see the whole matrix; a launch config's ``reshard_after_forward`` applies to the rest.
    Backward reshards them and reduce-scatters the head's gradient like any other."""
    if not is_fsdp(model):
        return
    for unit in _head_units(model):
        unit.set_reshard_after_forward(False, recurse=False)


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


def shard_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """Under FSDP2, shard the frozen teacher like the student (one unit per decoder layer, then the
    root), so each process holds 1/N of it; else return it as it is (each process its own copy)."""
    if not is_sharded(accelerator) or is_fsdp(teacher):
        return teacher
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in teacher.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(teacher, reshard_after_forward=False)  # its root stays gathered for the loss
    return teacher


def release(model: nn.Module | None) -> None:
    """Free what an FSDP2 model still holds gathered (a teacher's root after its forward; no
    backward will do it). A no-op for any other model."""
    if model is not None and is_fsdp(model):
        for unit in _units(model):
            unit.reshard()


@contextmanager
def whole(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every FSDP2 unit gathered and kept so for the block: forward passes inside
    it run no collective, so processes may decode different numbers of tokens. Costs the whole
    model's memory on each process for the block (as DeepSpeed's and TRL's generation gathers
    do). A no-op for any other model."""
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
    process, DDP: save it as it is); under FSDP2 every process must call this (it gathers), and
    the main process gets the weights."""
    return accelerator.get_state_dict(model) if is_sharded(accelerator) else None


def check_student(accelerator: Accelerator, transformed: bool) -> None:
    """Refuse what is not supported under FSDP2 yet: LoRA and QAT students."""
    if is_sharded(accelerator) and transformed:
        raise RecipeError(
            f"student.lora and student.qat run under DDP, not yet under {engine(accelerator)}: "
            "launch with configs/accelerate/ddp.yaml"
        )
