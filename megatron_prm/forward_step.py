"""The custom forward step handed to Megatron-Core's ``get_forward_backward_func``."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prm.data.batching import MicroBatch
from megatron_prm.data.context_split import split_for_context_parallel
from megatron_prm.loss import prm_loss, step_losses
from megatron_prm.model.load_balancing import LoadBalancing, load_balancing_of


def _next_local_batch(data_iterator: Iterator[MicroBatch], device: torch.device) -> MicroBatch:
    """The next micro batch, cut to this context-parallel rank's share of its sequences, on ``device``."""
    batch = split_for_context_parallel(next(data_iterator), parallel_state.get_context_parallel_rank(),
                                       parallel_state.get_context_parallel_world_size())
    return batch.to(device)


def _run_model(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    return model(batch.tokens, batch.position_ids, attention_mask=None, reward_index=batch.reward_index,
                 packed_seq_params=batch.packed_seq_params())


def _train_loss(targets: torch.Tensor, threshold: float, balance: Optional[LoadBalancing], logits: torch.Tensor):
    """:func:`prm_loss`; for a MoE base with a load-balancing loss the report also carries the micro batch's
    aux loss (its gradient is injected at the routers, see :mod:`megatron_prm.model.load_balancing`)."""
    loss_sum, count, report = prm_loss(targets, logits, threshold=threshold)
    if balance is not None:
        report["moe_load_balancing_loss"] = balance.finish_micro_batch().detach().reshape(1)
    return loss_sum, count, report


def make_train_forward_step(device: torch.device, threshold: float) -> Callable:
    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = _next_local_batch(data_iterator, device)
        balance = load_balancing_of(model)
        with balance.recording(batch.real_tokens) if balance is not None else contextlib.nullcontext():
            output = _run_model(model, batch)
        return output, partial(_train_loss, batch.label_values, threshold, balance)

    return forward_step


def _eval_loss(batch: MicroBatch, logits: torch.Tensor):
    """Like :func:`prm_loss`, and the report also carries every step's P(good) for the metrics."""
    losses = step_losses(logits, batch.label_values)
    count = torch.tensor(batch.label_values.numel(), dtype=torch.int, device=logits.device)
    report = {
        "loss_sum": losses.sum().detach(),
        "p_good": torch.softmax(logits.float(), dim=-1)[:, 0].detach(),
        "targets": batch.label_values,
        "record_ids": batch.record_ids,
        "step_ids": batch.step_ids,
    }
    return losses.sum(), count, report


def eval_forward_step(device: torch.device) -> Callable:
    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = _next_local_batch(data_iterator, device)
        output = _run_model(model, batch)
        return output, partial(_eval_loss, batch)

    return forward_step


def run_schedule(model: list, forward_step_func: Callable, batches: list[MicroBatch], forward_only: bool) -> list:
    """Megatron's forward/backward schedule over ``batches``; returns the loss reports (last stage only).

    Every model chunk (virtual pipeline stage) reads the same microbatches through its own iterator.
    Under pipeline parallelism the stages exchange activations of one fixed shape, so the batches
    must then all have the same length (see :func:`pad_to_length`).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        assert len({tuple(b.tokens.shape) for b in batches}) == 1, "pipeline microbatches must share one shape"
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=max(b.tokens.shape[0] for b in batches),
        forward_only=forward_only,
    )
