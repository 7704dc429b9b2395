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

from megatron_prm import megatron_compat, output_paths
from megatron_prm.checkpoint import (
    TrainState,
    layout_record,
    load_checkpoint,
    load_model_weights,
    optimizer_format,
    save_checkpoint,
)
from megatron_prm.checkpoint_io import CheckpointWriter
from megatron_prm.config import ConfigError, RunConfig, TrainingArguments
from megatron_prm.conversion.auto_import import start_from_hf_model
from megatron_prm.data.batching import BatchLayout, Collator, MicroBatch
from megatron_prm.data.pipeline import PreparedData, prepare_data, tokenize_job, with_tokenization
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.data.store import store_prefix
from megatron_prm.layout import ParallelLayout, resolve_layout
from megatron_prm.evaluation import evaluate, labelled_steps
from megatron_prm.flops import ModelShape, training_flops
from megatron_prm.forward_step import make_train_forward_step, run_schedule
from megatron_prm.metrics import majority_baseline
from megatron_prm.model.architecture import Architecture, resolve_architecture
from megatron_prm.model.load_balancing import (install_load_balancing, load_balancing_of, pipeline_note,
                                                 step_load_balancing_loss)
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks, padded_vocab_size
from megatron_prm.nonfinite import NonFiniteBudget, NonFiniteError
from megatron_prm.progress import plural
from megatron_prm.provenance import record_launch
from megatron_prm.run_logger import RunLogger, check_trackers
from megatron_prm.run_directory import (
    checkpoint_in_run,
    checkpoint_name,
    checkpoints,
    check_output_dir,
    move_earlier_run_aside,
    move_later_checkpoints_aside,
    read_latest,
    resolve_checkpoint,
)
from megatron_prm.runtime import Runtime, init_runtime
from megatron_prm.stop_signals import StopSignals
from megatron_prm.throughput import mfu, peak_memory_gib, peak_tflops, progress_line
from megatron_prm.training_state import CommunicationOverlap, TrainingState, build_training_state, parameters_gathered


def total_training_steps(config: RunConfig, data: PreparedData) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    steps = data.train.steps_for_epochs(config.training.num_train_epochs)
    assert steps is not None, "a streamed data set needs max_steps (checked in config.py)"
    return steps


def warmup_within(args: TrainingArguments, total_steps: int) -> tuple[TrainingArguments, Optional[str]]:
    """The schedule's arguments with a warmup shorter than the run, and a note when it had to be shortened.

    Only a length set by num_train_epochs gets here with warmup_steps >= total_steps (config.py refuses it
    against max_steps): a recipe's warmup then outlasts a small data set, as in a first run on a sample of
    the data. Megatron's scheduler needs the warmup to end before the decay does, so it ends one step early.
    """
    if args.warmup_steps < total_steps:
        return args, None
    shortened = total_steps - 1
    note = (f"warmup_steps {args.warmup_steps} is not below the {plural(total_steps, 'training step')} that "
            f"num_train_epochs {args.num_train_epochs:g} make of this data: warming up over {shortened} instead")
    return dataclasses.replace(args, warmup_steps=shortened), note


def data_position(data: PreparedData) -> dict:
    """The batch source's state to save; a stream's from every data-parallel rank (each reads its own share)."""
    position = data.train.state_dict()
    if position["kind"] != "streamed":
        return position  # the same on every rank
    group = parallel_state.get_data_parallel_group()
    ranks: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, position, group=group)
    return {"kind": "streamed", "ranks": ranks}


def restore_data_position(data: PreparedData, saved: TrainState, data_parallel_rank: int, checkpoint: Path) -> None:
    """Continue the data where the checkpoint's run stopped (by consumed samples, whatever the layout)."""
    position = saved.data_position
    if not position:  # written before the data position was saved: replay the steps with this layout
        for _ in range(saved.step):
            data.train.next_microbatches()
        return
    try:
        if position["kind"] == "streamed":
            ranks = position["ranks"]
            if len(ranks) != parallel_state.get_data_parallel_world_size():
                raise ValueError(f"the stream was read by {len(ranks)} data-parallel ranks and this run has "
                                 f"{parallel_state.get_data_parallel_world_size()}: a lazy stream resumes only "
                                 "with the same data-parallel size")
            position = ranks[data_parallel_rank]
        data.train.load_state_dict(position)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{checkpoint}: cannot continue the training data: {err}") from err


def _reduce_step_report(reports: list[dict], batches: list[MicroBatch], flops: float, device: torch.device) -> dict:
    """Loss, accuracy, tokens, samples and model FLOPs of one optimizer step, summed over microbatches and
    data parallel. Runs on every rank; only the last pipeline stage has losses. Under context parallelism
    each rank's losses are those of its own labelled steps, while its batches are the whole sequences
    that its context-parallel group shares: those are counted once, by context-parallel rank 0."""
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for report in reports:
        totals[:3] += report["prm"].to(totals)
    if parallel_state.get_context_parallel_rank() == 0:
        totals[3] = sum(b.num_real_tokens for b in batches)
        totals[4] = sum(b.num_samples for b in batches)
        totals[5] = flops
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    loss_sum, steps, correct, tokens, samples, flops = totals.tolist()
    figures = {"tokens": int(tokens), "samples": int(samples), "flops": flops}
    if parallel_state.is_pipeline_last_stage():
        figures.update(loss=loss_sum / steps if steps else 0.0, accuracy=correct / steps if steps else 0.0,
                       labelled_steps=int(steps))
    return figures


def _finite_everywhere(state: TrainingState, reports: list[dict], device: torch.device) -> bool:
    """Whether the losses (last pipeline stage) and, except under fp16's loss scaler, which skips
    overflowing steps itself, the gradients of every rank are finite."""
    finite = all(bool(torch.isfinite(report["prm"]).all()) for report in reports)
    if finite and not state.model[0].config.fp16:
        finite = megatron_compat.local_gradients_finite(state.model)
    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _moe_losses(state: TrainingState, reports: list[dict], num_microbatches: int, device: torch.device) -> dict:
    """MoE bases: the routers' auxiliary losses of the step, logged on their own, without their coefficients:
    ``moe_load_balancing_loss`` (transformers' definition, mean over micro batches) and ``moe_z_loss``
    (Megatron's, per micro batch, summed over the layers)."""
    if not state.model[0].config.num_moe_experts:
        return {}
    losses = step_load_balancing_loss(reports, num_microbatches, device)
    losses.update({f"moe_{name}": value for name, value in megatron_compat.moe_auxiliary_losses(num_microbatches).items()})
    return losses


def train_step(state: TrainingState, batches: list[MicroBatch], runtime: Runtime, threshold: float,
               flops: float = 0.0) -> dict:
    """One optimizer step over ``batches``; with a non-finite loss or gradient anywhere, no update and
    ``nonfinite``. ``flops`` (this replica's model FLOPs) is summed over data parallel into the figures."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    balance = load_balancing_of(state.model[0])
    if balance is not None:
        balance.begin_step(sum(b.label_values.numel() for b in batches), len(batches), runtime.device)
    reports = run_schedule(state.model, make_train_forward_step(runtime.device, threshold), batches, forward_only=False)
    if balance is not None:
        balance.end_step()
    moe = _moe_losses(state, reports, len(batches), runtime.device)
    if not _finite_everywhere(state, reports, runtime.device):
        return {"nonfinite": True, **_reduce_step_report(reports, batches, flops, runtime.device), **moe}
    learning_rate = state.optimizer.param_groups[0]["lr"]  # the rate this step applies
    updated, grad_norm, _ = state.optimizer.step()
    if updated:
        state.scheduler.step(increment=1)
    if grad_norm is not None and not math.isfinite(grad_norm):  # finite gradients whose norm overflowed
        raise NonFiniteError(f"the gradient norm is {grad_norm} although every gradient is finite; the run stops "
                             "before saving (lower learning_rate or max_grad_norm)")
    figures = {"lr": learning_rate, "grad_norm": float(grad_norm or 0.0), "skipped": not updated, "nonfinite": False}
    if state.model[0].config.fp16:
        figures["loss_scale"] = float(state.optimizer.get_loss_scale())
    figures.update(_reduce_step_report(reports, batches, flops, runtime.device), **moe)
    return figures


def _eval_line(step: int, total: int, metrics: dict) -> str:
    auroc = metrics.get("auroc")
    parts = [f"eval at step {step}/{total}", f"loss {metrics['loss']:.4f}", f"step acc {metrics['accuracy']:.3f}",
             f"neg F1 {metrics['neg_f1']:.3f}", f"AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}"]
    if "first_error_f1" in metrics:  # PRM mode only
        parts.append(f"first-error F1 {metrics['first_error_f1']:.3f}")
    return " | ".join(parts)


class TrainingInterrupted(Exception):
    """A stop signal arrived; the checkpoint of the last whole step was saved (the CLI exits with 0 after
    SIGTERM / SIGUSR1, so a requeued job resumes, and with 130 after Ctrl-C)."""

    def __init__(self, signal_name: str, interrupted: bool) -> None:
        super().__init__(signal_name)
        self.interrupted = interrupted


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
    shape: ModelShape
    checkpoints: CheckpointWriter

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)


def setup(config: RunConfig) -> Run:
    """Process group, data, model, optimizer; restores a checkpoint when resuming."""
    args = config.training
    check_trackers(config)
    for key in ("train_dataset_path", "dev_dataset_path"):
        path = getattr(config.data, key)
        if path and (key == "train_dataset_path" or args.do_eval) and not _data_exists(path):
            raise ConfigError(f"{key}: {path} does not exist (neither a file nor a preprocessed store prefix)")
    resume_source = _resume_source(config)
    check_output_dir(Path(args.output_dir), _resumes_in_place(resume_source, Path(args.output_dir))
                     or args.resume_from_checkpoint == "auto", args.overwrite_output_dir)
    if args.export_hf_dir:
        check_export_dir(Path(args.export_hf_dir))
    config = start_from_hf_model(with_tokenization(config, resume_source), int(os.environ.get("RANK", "0")))
    tokenizer = RecordTokenizer(tokenize_job(config, config.data.train_dataset_path))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len,
                                config.prm.reward_head, added_tokens=len(tokenizer.special.added))
    layout, layout_notes = resolve_layout(config, int(os.environ.get("WORLD_SIZE", "1")), arch)
    runtime = init_runtime(args.device, args.seed, layout)
    # fp8 / tp_comm_overlap without Transformer Engine stop here, before output_dir is touched
    options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu, arch.moe)
    if args.overwrite_output_dir and resume_source is None and runtime.rank == 0:
        aside = move_earlier_run_aside(Path(args.output_dir))
        if aside is not None:
            print(f"overwrite_output_dir: the earlier files of {args.output_dir} are now in {aside}", flush=True)
    if _resumes_in_place(resume_source, Path(args.output_dir)) and runtime.rank == 0:
        resumed = resolve_checkpoint(resume_source)
        aside, moved = move_later_checkpoints_aside(Path(args.output_dir), resumed)
        if aside is not None:
            print(f"resuming from {resumed.name}, earlier than the run's newest checkpoint: {', '.join(moved)} "
                  f"moved to {aside} (kept, not overwritten)", flush=True)
    dist.barrier()
    if runtime.rank == 0:
        record_launch(config, runtime.world_size)
    logger = RunLogger(runtime.is_logging_rank, config)
    logger.message(f"run directory {args.output_dir}: resolved config in config.json, provenance in provenance.jsonl")
    for note in layout_notes:
        logger.message(f"note: {note}")

    batch_layout = BatchLayout(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                               layout.data_parallel_size)
    data = prepare_data(config, tokenizer, batch_layout, runtime.data_parallel_rank,
                        show_progress=runtime.is_logging_rank, row_multiple=layout.sequence_multiple,
                        sample_multiple=layout.sample_multiple)
    logger.scalars("data", 0, data.reports,
                   line="\n".join(_describe_data(name, report) for name, report in data.reports.items()))

    chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len, options)
    install_load_balancing(chunks, arch.moe, args.moe_aux_loss_coeff, layout)
    if (moe_note := pipeline_note(arch.moe, args.moe_aux_loss_coeff, layout)) is not None:
        logger.message(f"note: {moe_note}")
    if config.model.model_name_or_path and resume_source is None:
        load_model_weights(chunks, config.model.model_name_or_path, arch, args.verify_checkpoint_checksums)
    total_steps = total_training_steps(config, data)
    schedule_args, warmup_note = warmup_within(args, total_steps)
    if warmup_note:
        logger.message(f"note: {warmup_note}")
    state = build_training_state(chunks, schedule_args, total_steps, layout.distributed_optimizer,
                                 CommunicationOverlap.from_config(config.parallel))
    fmt = optimizer_format(layout.distributed_optimizer, args.unified_checkpoint)
    train_state = TrainState(layout=layout_record(layout), optimizer_format=fmt)
    if resume_source is not None:
        saved, checkpoint = load_checkpoint(state, resume_source, arch, layout, fmt, args.verify_checkpoint_checksums)
        train_state = dataclasses.replace(saved, layout=layout_record(layout), optimizer_format=fmt)
        restore_data_position(data, train_state, runtime.data_parallel_rank, checkpoint)
        logger.message(f"resumed from {checkpoint} at step {train_state.step} ({train_state.consumed_samples} samples)")
    run_id = [train_state.run_id]  # a fresh run's (or a checkpoint's from before run ids): rank 0's for all
    dist.broadcast_object_list(run_id, src=0)
    train_state.run_id = run_id[0]
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    logger.message(
        f"model: {arch.num_hidden_layers} layers, hidden {arch.hidden_size}, {n_params / 1e6:.2f}M parameters on "
        f"this rank; {plural(runtime.world_size, 'process')} on {runtime.device.type}: tensor {layout.tensor_parallel_size} x "
        f"{f'context {layout.context_parallel_size} x ' if layout.context_parallel_size > 1 else ''}pipeline {layout.pipeline_parallel_size} (virtual {layout.virtual_pipeline_parallel_size}) x data "
        f"{layout.data_parallel_size}; global batch {batch_layout.global_batch_size}; {total_steps} steps"
    )
    collator = Collator(data.pad_id, layout.sequence_multiple, uniform_length=layout.pipeline_parallel_size > 1,
                        packing=data.packing.options if data.packing else None,
                        fixed_length=config.data.max_seq_len if config.parallel.tp_comm_overlap else None)
    shape = ModelShape.from_architecture(arch, padded_vocab_size(arch.vocab_size, layout.tensor_parallel_size))
    return Run(config, runtime, logger, arch, layout, data, state, collator, total_steps, train_state, shape,
               CheckpointWriter(async_save=args.async_save))


def _data_exists(path: str) -> bool:
    return Path(path).exists() or store_prefix(path) is not None


def _describe_data(name: str, report: dict) -> str:
    """One line about a data set: what was read, kept and dropped."""
    if "records" not in report:
        return f"{name} data: {', '.join(f'{k} {v}' for k, v in report.items())}"
    good = report.get("positive_share")
    parts = [f"{report['records']} records", f"{report['kept']} kept", f"{report['truncated']} truncated",
             f"{report['dropped']} dropped", f"{report['steps']} steps"
             + (f" ({good:.1%} good)" if good is not None else "")]
    if report.get("invalid"):
        parts.append(f"{report['invalid']} invalid (skipped)")
    if report.get("tokens") is not None:
        parts.append(f"{report['tokens']:,} tokens")
    return f"{name} data: " + ", ".join(parts)


def _resume_source(config: RunConfig) -> Optional[str]:
    """The checkpoint or run directory to resume from; None for a fresh start. ``auto`` resumes from
    output_dir's ``latest`` when there is one (a requeued job) and starts fresh otherwise."""
    setting, output_dir = config.training.resume_from_checkpoint, Path(config.training.output_dir)
    if setting == "auto":
        if read_latest(output_dir) is not None:
            return str(output_dir)
        if checkpoints(output_dir):
            raise ConfigError(f"resume_from_checkpoint auto: {output_dir} holds checkpoints but no latest; name "
                              "the one to resume from")
        return None
    return str(output_dir) if setting == "latest" else setting


def _resumes_in_place(source: Optional[str], output_dir: Path) -> bool:
    """Whether ``source`` is a checkpoint of ``output_dir`` itself (a resume that writes on in its own run
    directory); a resume into another directory must find that one empty."""
    if source is None:
        return False
    checkpoint = resolve_checkpoint(source)
    return output_dir.is_dir() and checkpoint.parent.resolve() == output_dir.resolve()


def run_eval(run: Run, step: int) -> Optional[dict]:
    """Evaluate on the dev set; the metrics on the logging rank, None elsewhere or without a dev set."""
    if run.data.dev is None:
        return None
    config = run.config
    with parameters_gathered(run.state.model):
        metrics = evaluate(run.state.model, run.data.dev, config.training.per_device_eval_batch_size, run.collator,
                           run.runtime.device, config.prm.score_threshold, config.prm.process_reward, run.data.packing,
                           show_progress=run.runtime.is_logging_rank)
    if metrics is not None:
        run.logger.scalars("eval", step, metrics, line=_eval_line(step, run.total_steps, metrics))
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
    run.train_state.data_position = data_position(run.data)
    with parameters_gathered(run.state.model):
        save_checkpoint(run.state, run.output_dir, run.config, run.arch, run.train_state, run.checkpoints,
                        args.save_total_limit, on_published=lambda path: run.logger.message(f"saved checkpoint {path}"))


def _save_due(run: Run, step: int) -> bool:
    args = run.config.training
    if args.save_strategy == "no":
        return False
    if step == run.total_steps:
        return True
    if args.save_strategy == "epoch":
        return run.data.train.epoch_ended
    return step % args.save_steps == 0


def check_export_dir(export_dir: Path) -> None:
    """export_hf_dir, checked before anything is written: a new or empty directory."""
    output_paths.check_output_dir(export_dir, what="export_hf_dir")
    if export_dir.is_dir() and any(export_dir.iterdir()):
        raise ConfigError(f"export_hf_dir {export_dir} already exists and is not empty; choose another directory")


def export_final_model(run: Run) -> dict:
    """Write the run's final checkpoint (its best, when load_best_model_at_end found one) as an HF model."""
    from megatron_prm.conversion.exporter import export_hf

    name = run.train_state.best_checkpoint if run.config.training.load_best_model_at_end else None
    checkpoint = run.output_dir / (name or checkpoint_name(run.total_steps))
    return export_hf(checkpoint, Path(run.config.training.export_hf_dir), progress=run.runtime.is_logging_rank)


def run_training(config: RunConfig) -> Optional[dict]:
    """Train (and evaluate) as configured. Returns the final eval metrics on the logging rank."""
    stop = StopSignals()  # from the start: a signal during setup stops after the first step
    run = setup(config)
    args = config.training
    peak = peak_tflops(run.runtime.device, args.peak_tflops)
    first_step = run.train_state.step + 1
    train_seconds = 0.0  # optimizer steps only (no evaluation, no saving): the basis of the ETA
    metrics = None
    nonfinite = NonFiniteBudget(args.max_skipped_nonfinite_steps, skipped=run.train_state.skipped_nonfinite_steps)
    for step in range(first_step, run.total_steps + 1 if args.do_train else 1):
        step_start = time.perf_counter()
        samples = run.data.train.next_microbatches()
        flops = training_flops(run.shape, [len(sample) for micro in samples for sample in micro], with_logits=False)
        figures = train_step(run.state, run.collator(samples), run.runtime, config.prm.score_threshold, flops)
        if figures.pop("nonfinite"):
            nonfinite.record(step, figures.pop("loss", None))
            run.train_state.skipped_nonfinite_steps = nonfinite.skipped
            figures.pop("accuracy", None)
            run.logger.message(f"step {step}: non-finite loss or gradient, no update "
                               f"({nonfinite.skipped} of {nonfinite.limit} allowed)")
        run.train_state.consumed_samples += figures["samples"]
        elapsed = time.perf_counter() - step_start
        train_seconds += elapsed
        if step % args.logging_steps == 0 and "loss" in figures:
            figures.update(
                step_time_s=elapsed, tokens_per_s=figures["tokens"] / elapsed,
                tokens_per_s_per_device=figures["tokens"] / elapsed / run.runtime.world_size,
                mfu=mfu(figures["flops"], elapsed, run.runtime.world_size, peak),
                peak_memory_gib=peak_memory_gib(run.runtime.device),
                eta_s=train_seconds / (step - first_step + 1) * (run.total_steps - step),
            )
            run.logger.scalars("train", step, figures,
                               line=progress_line(step, run.total_steps, figures, run.runtime.device.type))
        metrics = run_eval(run, step) if step % args.eval_steps == 0 or step == run.total_steps else None
        stopping = stop.requested(run.runtime.device) and step < run.total_steps
        if _save_due(run, step) or stopping:
            if metrics is None and args.load_best_model_at_end:
                metrics = run_eval(run, step)  # an epoch end between evaluations: rank this checkpoint too
            save(run, step, metrics)
        run.checkpoints.poll()  # publishes an asynchronous save that every rank has finished writing
        if stopping:
            run.checkpoints.wait()
            run.logger.message(f"received {stop.name}: saved the checkpoint of step {step} and stopped; run again "
                               "with resume_from_checkpoint auto (or latest) to continue")
            run.logger.close()
            stop.restore()
            raise TrainingInterrupted(stop.name, stop.interrupted)
    stop.restore()
    run.checkpoints.wait()

    if not args.do_train:
        metrics = run_eval(run, 0)
    elif args.load_best_model_at_end and run.train_state.best_checkpoint not in (None, checkpoint_name(run.total_steps)):
        best = checkpoint_in_run(run.output_dir, run.train_state.best_checkpoint, f"{run.output_dir} best_checkpoint")
        load_model_weights(run.state.model, best, run.arch, args.verify_checkpoint_checksums)
        run.logger.message(f"loaded the best checkpoint {run.train_state.best_checkpoint} "
                           f"({args.metric_for_best_model} {run.train_state.best_metric:.4g})")
        metrics = run_eval(run, run.total_steps)
    if args.export_hf_dir and args.do_train and run.runtime.rank == 0:
        exported = export_final_model(run)
        run.logger.message(f"exported {exported['checkpoint']} to {exported['output']} (HF {exported['architecture']})")
    if metrics is not None and run.data.train_source is not None:
        majority_good = run.data.train_source.good_share() >= 0.5
        baseline = majority_baseline(labelled_steps(run.data.dev), majority_good, config.prm.process_reward)
        metrics = {**metrics, "majority_baseline": baseline}
        if args.load_best_model_at_end:
            metrics["best_checkpoint"] = run.train_state.best_checkpoint
    run.logger.close()
    return metrics if run.runtime.is_logging_rank else None
