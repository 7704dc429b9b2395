"""The training loop: forward/backward over microbatches, optimizer step, log, evaluate, save."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_prm.checkpoint import load_model_weights, save_model_checkpoint
from megatron_prm.config import RunConfig
from megatron_prm.data.batching import BatchLayout, Collator, MicroBatch
from megatron_prm.data.pipeline import prepare_data, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.layout import resolve_layout
from megatron_prm.evaluation import evaluate, labelled_steps
from megatron_prm.forward_step import make_train_forward_step, run_schedule
from megatron_prm.metrics import majority_baseline
from megatron_prm.model.architecture import resolve_architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.run_logger import RunLogger
from megatron_prm.runtime import Runtime, init_runtime
from megatron_prm.training_state import TrainingState, build_training_state


def total_training_steps(config: RunConfig, steps_per_epoch: Optional[int]) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    assert steps_per_epoch is not None, "a streamed data set needs max_steps"
    return max(1, math.ceil(config.training.num_train_epochs * steps_per_epoch))


def _reduce_step_report(reports: list[dict], num_real_tokens: int, device: torch.device) -> dict:
    """Loss, accuracy and tokens of one optimizer step, summed over microbatches and data parallel."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for report in reports:
        totals[:3] += report["prm"].to(totals)
    totals[3] = num_real_tokens
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    loss_sum, steps, correct, tokens = totals.tolist()
    return {
        "loss": loss_sum / steps if steps else 0.0,
        "accuracy": correct / steps if steps else 0.0,
        "labelled_steps": int(steps),
        "tokens": int(tokens),
    }


def train_step(state: TrainingState, batches: list[MicroBatch], runtime: Runtime, threshold: float) -> dict:
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    reports = run_schedule(state.model, make_train_forward_step(runtime.device, threshold), batches, forward_only=False)
    learning_rate = state.optimizer.param_groups[0]["lr"]  # the rate this step applies
    updated, grad_norm, _ = state.optimizer.step()
    if updated:
        state.scheduler.step(increment=1)
    figures = {"lr": learning_rate, "grad_norm": float(grad_norm or 0.0), "skipped": not updated}
    if state.model[0].config.fp16:
        figures["loss_scale"] = float(state.optimizer.get_loss_scale())
    if parallel_state.is_pipeline_last_stage():
        figures.update(_reduce_step_report(reports, sum(b.num_real_tokens for b in batches), runtime.device))
    return figures


def _format(prefix: str, step: int, total: int, figures: dict, keys: tuple[str, ...]) -> str:
    parts = [f"{prefix} step {step}/{total}"]
    for key in keys:
        value = figures.get(key)
        if value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def run_training(config: RunConfig) -> Optional[dict]:
    """Train (and evaluate) as configured. Returns the final eval metrics on the logging rank."""
    args = config.training
    tokenizer = RecordTokenizer(tokenize_job(config, config.data.train_dataset_path))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len)
    layout, layout_notes = resolve_layout(config, int(os.environ.get("WORLD_SIZE", "1")), arch)
    runtime = init_runtime(args.device, args.seed, layout)
    logger = RunLogger(runtime.is_logging_rank, args.output_dir, args.tensorboard_dir)
    logger.message("resolved config:\n" + config.describe())
    for note in layout_notes:
        logger.message(f"note: {note}")
    if runtime.rank == 0:
        config.save(Path(args.output_dir) / "config.json")

    batch_layout = BatchLayout(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                               layout.data_parallel_size)
    data = prepare_data(config, tokenizer, batch_layout, runtime.data_parallel_rank,
                        show_progress=runtime.is_logging_rank, row_multiple=layout.sequence_multiple)
    logger.scalars("data", 0, data.reports,
                   line="\n".join(f"{name} data: {report}" for name, report in data.reports.items()))

    options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu)
    chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len, options)
    if config.model.model_name_or_path:
        load_model_weights(chunks, config.model.model_name_or_path)
    total_steps = total_training_steps(config, data.train.steps_per_epoch)
    state = build_training_state(chunks, args, total_steps, layout.distributed_optimizer)
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    logger.message(
        f"model: {arch.num_hidden_layers} layers, hidden {arch.hidden_size}, {n_params / 1e6:.2f}M parameters on "
        f"this rank; {runtime.world_size} processes on {runtime.device.type}: tensor {layout.tensor_parallel_size} x "
        f"pipeline {layout.pipeline_parallel_size} (virtual {layout.virtual_pipeline_parallel_size}) x data "
        f"{layout.data_parallel_size}; global batch {batch_layout.global_batch_size}; {total_steps} steps "
        f"({data.train.steps_per_epoch or 'streamed, unknown'} per epoch)"
    )

    collator = Collator(data.pad_id, layout.sequence_multiple, uniform_length=layout.pipeline_parallel_size > 1,
                        packing=data.packing.options if data.packing else None)

    def run_eval(step: int) -> Optional[dict]:
        if data.dev is None:
            return None
        metrics = evaluate(state.model, data.dev, args.per_device_eval_batch_size, collator, runtime.device,
                           config.prm.score_threshold, config.prm.process_reward, data.packing)
        if metrics is not None:
            logger.scalars("eval", step, metrics, line=_format("eval", step, total_steps, metrics, (
                "loss", "accuracy", "neg_f1", "auroc", "first_error_f1")))
        return metrics

    progress = tqdm(total=total_steps, desc="training", disable=None if runtime.is_logging_rank else True)
    step_start = time.perf_counter()
    for step in range(1, total_steps + 1 if args.do_train else 1):
        batches = collator(data.train.microbatches(step - 1))
        figures = train_step(state, batches, runtime, config.prm.score_threshold)
        elapsed = time.perf_counter() - step_start
        step_start = time.perf_counter()
        progress.update(1)
        if step % args.logging_steps == 0 and "tokens" in figures:
            figures["step_time_s"] = elapsed
            figures["tokens_per_s"] = figures["tokens"] / elapsed
            figures["tokens_per_s_per_device"] = figures["tokens_per_s"] / runtime.world_size
            logger.scalars("train", step, figures, line=_format("train", step, total_steps, figures, (
                "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s")))
        if step % args.eval_steps == 0 and step != total_steps:
            run_eval(step)
        if step % args.save_steps == 0 and step != total_steps:
            save_model_checkpoint(state.model, Path(args.output_dir), step, config, arch)
    progress.close()

    if args.do_train:
        save_model_checkpoint(state.model, Path(args.output_dir), total_steps, config, arch)
    final_metrics = run_eval(total_steps)
    if final_metrics is not None and data.train_source is not None:
        majority_good = data.train_source.good_share() >= 0.5
        baseline = majority_baseline(labelled_steps(data.dev), majority_good, config.prm.process_reward)
        final_metrics = {**final_metrics, "majority_baseline": baseline}
    logger.close()
    return final_metrics if runtime.is_logging_rank else None
