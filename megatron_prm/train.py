"""The training loop: forward/backward over microbatches, optimizer step, log, evaluate, save."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_prm.checkpoint import (
    TrainState,
    checkpoint_name,
    layout_record,
    load_checkpoint,
    load_model_weights,
    optimizer_format,
    save_checkpoint,
)
from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.data.batching import BatchLayout, Collator, MicroBatch
from megatron_prm.data.pipeline import PreparedData, StreamedTrainBatches, prepare_data, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.layout import ParallelLayout, resolve_layout
from megatron_prm.evaluation import evaluate, labelled_steps
from megatron_prm.forward_step import make_train_forward_step, run_schedule
from megatron_prm.metrics import majority_baseline
from megatron_prm.model.architecture import Architecture, resolve_architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.run_logger import RunLogger
from megatron_prm.runtime import Runtime, init_runtime
from megatron_prm.training_state import TrainingState, build_training_state


def total_training_steps(config: RunConfig, steps_per_epoch: Optional[int]) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    assert steps_per_epoch is not None, "a streamed data set needs max_steps"
    return max(1, math.ceil(config.training.num_train_epochs * steps_per_epoch))


def _reduce_step_report(reports: list[dict], batches: list[MicroBatch], device: torch.device) -> dict:
    """Loss, accuracy, tokens and samples of one optimizer step, summed over microbatches and data
    parallel. Runs on every rank; only the last pipeline stage has losses."""
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    for report in reports:
        totals[:3] += report["prm"].to(totals)
    totals[3] = sum(b.num_real_tokens for b in batches)
    totals[4] = sum(b.num_samples for b in batches)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    loss_sum, steps, correct, tokens, samples = totals.tolist()
    figures = {"tokens": int(tokens), "samples": int(samples)}
    if parallel_state.is_pipeline_last_stage():
        figures.update(loss=loss_sum / steps if steps else 0.0, accuracy=correct / steps if steps else 0.0,
                       labelled_steps=int(steps))
    return figures


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
    figures.update(_reduce_step_report(reports, batches, runtime.device))
    return figures


def _format(prefix: str, step: int, total: int, figures: dict, keys: tuple[str, ...]) -> str:
    parts = [f"{prefix} step {step}/{total}"]
    for key in keys:
        value = figures.get(key)
        if value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


@dataclass
class Run:
    """Everything a training run holds once it is set up."""

    config: RunConfig
    runtime: Runtime
    logger: RunLogger
    arch: Architecture
    layout: ParallelLayout
    data: PreparedData
    state: TrainingState
    collator: Collator
    total_steps: int
    train_state: TrainState

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)


def setup(config: RunConfig) -> Run:
    """Process group, data, model, optimizer; restores a checkpoint when resuming."""
    args = config.training
    tokenizer = RecordTokenizer(tokenize_job(config, config.data.train_dataset_path))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len,
                                config.prm.reward_head, added_tokens=len(tokenizer.special.added))
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
    if args.save_strategy == "epoch" and data.train.steps_per_epoch is None:
        raise ConfigError("save_strategy epoch needs a known epoch length; a streamed (lazy) data set has none")

    options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu)
    chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len, options)
    if config.model.model_name_or_path and not args.resume_from_checkpoint:
        load_model_weights(chunks, config.model.model_name_or_path, arch)
    total_steps = total_training_steps(config, data.train.steps_per_epoch)
    state = build_training_state(chunks, args, total_steps, layout.distributed_optimizer)
    fmt = optimizer_format(layout.distributed_optimizer, args.unified_checkpoint)
    train_state = TrainState(layout=layout_record(layout), optimizer_format=fmt)
    if args.resume_from_checkpoint:
        source = args.output_dir if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        saved, checkpoint = load_checkpoint(state, source, arch, layout, fmt)
        train_state = dataclasses.replace(saved, layout=layout_record(layout), optimizer_format=fmt)
        if isinstance(data.train, StreamedTrainBatches):
            data.train.fast_forward(train_state.step)
        logger.message(f"resumed from {checkpoint} at step {train_state.step} ({train_state.consumed_samples} samples)")
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
    return Run(config, runtime, logger, arch, layout, data, state, collator, total_steps, train_state)


def run_eval(run: Run, step: int) -> Optional[dict]:
    """Evaluate on the dev set; the metrics on the logging rank, None elsewhere or without a dev set."""
    if run.data.dev is None:
        return None
    config = run.config
    metrics = evaluate(run.state.model, run.data.dev, config.training.per_device_eval_batch_size, run.collator,
                       run.runtime.device, config.prm.score_threshold, config.prm.process_reward, run.data.packing)
    if metrics is not None:
        run.logger.scalars("eval", step, metrics, line=_format("eval", step, run.total_steps, metrics, (
            "loss", "accuracy", "neg_f1", "auroc", "first_error_f1")))
    return metrics


def save(run: Run, step: int, metrics: Optional[dict]) -> None:
    """Save a checkpoint at ``step``, first recording it as the best if its metric is the best yet."""
    args = run.config.training
    if args.load_best_model_at_end:
        # Only the last rank holds the metrics; every rank must agree on the best checkpoint.
        value = [metrics.get(args.metric_for_best_model) if metrics else None]
        dist.broadcast_object_list(value, src=run.runtime.world_size - 1)
        if value[0] is None:
            raise ConfigError(f"metric_for_best_model {args.metric_for_best_model!r} is not among the eval metrics")
        best = run.train_state.best_metric
        if best is None or (value[0] > best if args.best_is_greater else value[0] < best):
            run.train_state.best_metric = float(value[0])
            run.train_state.best_checkpoint = checkpoint_name(step)
    run.train_state.step = step
    path = save_checkpoint(run.state, run.output_dir, run.config, run.arch, run.train_state, args.save_total_limit)
    run.logger.message(f"saved checkpoint {path}")


def _save_due(run: Run, step: int) -> bool:
    args = run.config.training
    if args.save_strategy == "no":
        return False
    if step == run.total_steps:
        return True
    if args.save_strategy == "epoch":
        return step % run.data.train.steps_per_epoch == 0
    return step % args.save_steps == 0


def run_training(config: RunConfig) -> Optional[dict]:
    """Train (and evaluate) as configured. Returns the final eval metrics on the logging rank."""
    run = setup(config)
    args = config.training
    progress = tqdm(total=run.total_steps, initial=run.train_state.step, desc="training",
                    disable=None if run.runtime.is_logging_rank else True)
    metrics = None
    step_start = time.perf_counter()
    for step in range(run.train_state.step + 1, run.total_steps + 1 if args.do_train else 1):
        figures = train_step(run.state, run.collator(run.data.train.microbatches(step - 1)), run.runtime,
                             config.prm.score_threshold)
        run.train_state.consumed_samples += figures["samples"]
        elapsed = time.perf_counter() - step_start
        progress.update(1)
        if step % args.logging_steps == 0 and "loss" in figures:
            figures.update(step_time_s=elapsed, tokens_per_s=figures["tokens"] / elapsed,
                           tokens_per_s_per_device=figures["tokens"] / elapsed / run.runtime.world_size)
            run.logger.scalars("train", step, figures, line=_format("train", step, run.total_steps, figures, (
                "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s")))
        metrics = run_eval(run, step) if step % args.eval_steps == 0 or step == run.total_steps else None
        if _save_due(run, step):
            save(run, step, metrics)
        step_start = time.perf_counter()
    progress.close()

    if not args.do_train:
        metrics = run_eval(run, 0)
    elif args.load_best_model_at_end and run.train_state.best_checkpoint not in (None, checkpoint_name(run.total_steps)):
        load_model_weights(run.state.model, run.output_dir / run.train_state.best_checkpoint, run.arch)
        run.logger.message(f"loaded the best checkpoint {run.train_state.best_checkpoint} "
                           f"({args.metric_for_best_model} {run.train_state.best_metric:.4g})")
        metrics = run_eval(run, run.total_steps)
    if metrics is not None and run.data.train_source is not None:
        majority_good = run.data.train_source.good_share() >= 0.5
        baseline = majority_baseline(labelled_steps(run.data.dev), majority_good, config.prm.process_reward)
        metrics = {**metrics, "majority_baseline": baseline}
        if args.load_best_model_at_end:
            metrics["best_checkpoint"] = run.train_state.best_checkpoint
    run.logger.close()
    return metrics if run.runtime.is_logging_rank else None
