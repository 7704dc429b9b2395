"""Model chunks wrapped for mixed precision and data parallelism, the optimizer and the LR schedule."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from megatron_prm import megatron_compat
from megatron_prm.config import ConfigError, ParallelArguments, TrainingArguments
from megatron_prm.model.prm_model import PRMGPTModel

_DECAY_STYLE = {"linear": "linear", "cosine": "cosine", "constant": "constant"}


@dataclass(frozen=True)
class CommunicationOverlap:
    """Which data-parallel communication Megatron overlaps with computation."""

    grad_reduce: bool = False  # DDP buckets reduced during the backward pass
    param_gather: bool = False  # distributed optimizer: updated parameters gathered during the next forward

    @classmethod
    def from_config(cls, parallel: ParallelArguments) -> "CommunicationOverlap":
        return cls(parallel.overlap_grad_reduce, parallel.overlap_param_gather)


@dataclass
class TrainingState:
    model: list  # DDP-wrapped model chunks
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def wrap_model(chunks: list[PRMGPTModel], args: TrainingArguments, distributed_optimizer: bool,
               overlap: CommunicationOverlap = CommunicationOverlap()) -> list[DistributedDataParallel]:
    """Float16Module for bf16/fp16, then Megatron DDP with one contiguous gradient buffer per chunk."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=overlap.grad_reduce,
        overlap_param_gather=overlap.param_gather,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if (args.bf16 or args.fp16) else chunk
        # Only the first chunk buckets its gradients, as in Megatron-LM's get_model.
        wrapped.append(DistributedDataParallel(config, ddp_config, module, disable_bucketing=index > 0))
    return wrapped


def build_training_state(chunks: list[PRMGPTModel], args: TrainingArguments, total_steps: int,
                         distributed_optimizer: bool = False,
                         overlap: CommunicationOverlap = CommunicationOverlap()) -> TrainingState:
    """Megatron DDP, the (distributed) Adam optimizer with loss scaling for fp16, and the LR schedule."""
    if args.warmup_steps >= total_steps:
        raise ConfigError(f"warmup_steps ({args.warmup_steps}) must be below the number of training steps ({total_steps})")
    model = wrap_model(chunks, args, distributed_optimizer, overlap)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=args.learning_rate,
        min_lr=args.min_learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_epsilon,
        clip_grad=args.max_grad_norm,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=chunks[0].config.params_dtype,
        initial_loss_scale=args.scale_loss,
        use_distributed_optimizer=distributed_optimizer,
    )
    megatron_compat.apply()
    optimizer = get_megatron_optimizer(optimizer_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.warmup_steps else args.learning_rate,
        max_lr=args.learning_rate,
        min_lr=args.min_learning_rate,
        lr_warmup_steps=args.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=_DECAY_STYLE[args.lr_scheduler_type],
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if overlap.grad_reduce:
        # As Megatron-LM's training loop: the schedules hold back the reduction until the last
        # microbatch (no_sync) and, under pipeline parallelism, start it per model chunk.
        config.no_sync_func = _per_chunk([chunk.no_sync for chunk in model])
        config.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in model])
    return TrainingState(model=model, optimizer=optimizer, scheduler=scheduler)


def _per_chunk(functions: list):
    """Megatron's schedules take one function for one model chunk, else a list."""
    return functions[0] if len(functions) == 1 else functions


@contextlib.contextmanager
def parameters_gathered(model: list) -> Iterator[None]:
    """The model's parameters up to date for evaluating or saving.

    With ``overlap_param_gather`` the optimizer step leaves the all-gather of the updated parameters to
    the next forward pass (forward pre-hooks); as Megatron-LM does around evaluation and checkpointing,
    the hooks are removed with a synchronous gather, and put back afterwards.
    """
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
