"""``megatron-prm reshard``: rewrite a training checkpoint so that a resume may change tensor/pipeline layout.

Regular saves keep the distributed optimizer's state in the ``dp_reshardable`` format: every rank writes
what it holds and nothing is gathered, but the state only reshards over data parallelism. When a run must
move to another tensor/pipeline layout, this command loads the checkpoint under its own tensor x pipeline
layout (any data-parallel size that divides the processes: fewer GPUs than the run had will do, as long as
the optimizer state fits) and writes it again, model weights and all, in the ``fully_reshardable`` format,
gathered on data-parallel rank 0 (Megatron-Core's memory-efficient variant): a one-off cost paid when asked,
not at every save. The result is the first checkpoint of a new run directory; ``train`` resumes from it
under any layout and saves in its own format from then on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from megatron_prm.checkpoint import (
    CONFIG_NAME,
    checkpoint_tokenizer,
    layout_record,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
    saved_layout,
)
from megatron_prm.checkpoint_io import CheckpointWriter
from megatron_prm.config import ConfigError, RunConfig, load_config
from megatron_prm.data.pipeline import tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.layout import resolve_layout
from megatron_prm.model.architecture import resolve_architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.run_directory import check_output_dir, resolve_checkpoint
from megatron_prm.runtime import init_runtime, shutdown
from megatron_prm.training_state import build_training_state

RESHARDED_FORMAT = "fully_reshardable"


def reshard_config(checkpoint: Path, output_dir: str, device: str, layout: dict) -> RunConfig:
    """The run's own settings under its saved tensor/context/pipeline layout, writing into ``output_dir``."""
    overrides = {"tensor_parallel_degree": layout["tensor"], "pipeline_parallel_degree": layout["pipeline"],
                 "context_parallel_degree": layout["context"],
                 "virtual_pp_degree": layout["virtual_pipeline"], "model_name_or_path": str(checkpoint),
                 "tokenizer_name_or_path": checkpoint_tokenizer(str(checkpoint)), "output_dir": output_dir,
                 "device": device, "resume_from_checkpoint": None, "unified_checkpoint": True, "async_save": False}
    return load_config(checkpoint / CONFIG_NAME, [f"--{key}={value}" if value is not None else f"--{key}=null"
                                                  for key, value in overrides.items()])


def reshard(source: str, output_dir: str, device: str, world_size: int) -> Path:
    """Write ``source`` (a checkpoint or run directory) fully reshardable as ``output_dir``'s first
    checkpoint; returns its path."""
    checkpoint = resolve_checkpoint(source)
    saved = read_train_state(checkpoint)
    if saved.optimizer_format != "dp_reshardable":
        what = ("holds model weights only" if not saved.optimizer_format else
                f"stores its optimizer state as {saved.optimizer_format!r}, which already loads under any layout")
        raise ConfigError(f"{checkpoint} {what}: nothing to reshard; resume from it directly")
    check_output_dir(Path(output_dir), resuming=False, overwrite=False)
    saved_parallel = saved_layout(saved)
    config = reshard_config(checkpoint, output_dir, device, saved_parallel)
    model_parallel = saved_parallel["tensor"] * saved_parallel["context"] * saved_parallel["pipeline"]
    if world_size % model_parallel:
        raise ConfigError(f"{checkpoint} was saved under tensor {saved_parallel['tensor']} x context "
                          f"{saved_parallel['context']} x pipeline {saved_parallel['pipeline']}: run reshard on a multiple of {model_parallel} processes "
                          f"(torchrun --nproc-per-node ...), not {world_size}")
    tokenizer = RecordTokenizer(tokenize_job(config, ""))
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len,
                                config.prm.reward_head, added_tokens=len(tokenizer.special.added))
    layout, _ = resolve_layout(config, world_size, arch)
    runtime = init_runtime(device, config.training.seed, layout)
    try:
        options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu)
        chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len, options)
        # The schedule's length is restored from the checkpoint; any value past the warm-up builds it.
        state = build_training_state(chunks, config.training, config.training.warmup_steps + 1,
                                     layout.distributed_optimizer)
        train_state, _ = load_checkpoint(state, checkpoint, arch, layout, "dp_reshardable",
                                         config.training.verify_checkpoint_checksums)
        train_state = dataclasses.replace(train_state, layout=layout_record(layout), optimizer_format=RESHARDED_FORMAT,
                                          best_checkpoint=None, best_metric=None)
        path = save_checkpoint(state, Path(output_dir), config, arch, train_state, CheckpointWriter(constant_structure=False))
        dist.barrier()
        return path
    finally:
        shutdown()
