"""Scoring solutions with a trained PRM: P(good) of every step and aggregates per record.

Runs the training stack forward-only (same model builder, parallel layouts, packed rows and
evaluation schedule), so a model scores exactly as it was evaluated during training. Records need
no labels; everything in a record besides ``src``/``tgt``/``responses`` is passed through to the
output, so benchmark fields (``id``, ``label``, ``group``, ``answer``, ``correct``) reach ``evaluate``.

Sharded by data-parallel rank: the records are tokenized once (rank 0, into ``OUTPUT.parts/``), every
rank opens that store and scores its share of the microbatches, writes its step scores as a part, and
one rank merges the parts in record order into the output and removes ``OUTPUT.parts/``. The microbatches
are the same whatever the number of ranks, so the output is the same byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prm import strict_json
from megatron_prm.checkpoint import (
    CONFIG_NAME,
    MODEL_CONFIG_NAME,
    checkpoint_tokenizer,
    load_model_weights,
    resolve_checkpoint,
)
from megatron_prm.config import (DEFAULT_MAX_SEQ_LEN, LEGACY_TOKENIZATION, ConfigError, ParallelArguments, RunConfig,
                                 load_config, read_config_file)
from megatron_prm.data.batching import Collator
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.pipeline import Packing, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
from megatron_prm.data.records import iter_raw_records
from megatron_prm.data.store import TokenStore
from megatron_prm.data.store_cache import tokenize_once
from megatron_prm.evaluation import predict
from megatron_prm.layout import resolve_layout
from megatron_prm.model.architecture import read_hf_config, resolve_architecture, reward_head_of
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.progress import plural
from megatron_prm.runtime import init_runtime

AGGREGATES = ("min", "last", "prod", "mean", "max")
# Settings a scoring run takes over from the training run that wrote the checkpoint. Not the precision:
# scoring runs in fp32 unless told (--bf16 true / --fp16 true), whatever the training used.
_INHERITED = ("tokenizer_name_or_path", "placeholder_token", "reward_tokens", "process_reward", "max_seq_len",
              "max_prompt_len", "apply_chat_template", "system_prompt", "score_threshold", "reward_head",
              "tokenization")


def aggregate(scores: list[float], how: str) -> Optional[float]:
    """One score for a solution from its step scores (None when no step was scored)."""
    if not scores:
        return None
    if how == "min":
        return min(scores)
    if how == "max":
        return max(scores)
    if how == "last":
        return scores[-1]
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    raise ValueError(f"unknown aggregate {how!r}; choose from {', '.join(AGGREGATES)}")


def scoring_config(checkpoint: str, data: str, overrides: list[str]) -> RunConfig:
    """The checkpoint's own run settings (special tokens, lengths, reward head) and the tokenizer it
    carries, fp32, then ``overrides``."""
    directory = resolve_checkpoint(checkpoint)
    saved = directory / CONFIG_NAME
    # A checkpoint converted from an MLP-head PRM has no run settings but says so in its model config.
    model_config = read_hf_config(directory / MODEL_CONFIG_NAME)
    values = {"reward_head": reward_head_of(model_config)}
    # Without run settings (a converted model), sequences are as long as the default allows and the model was
    # built for: a small model's max_position_embeddings, not a default it cannot take.
    longest = model_config.get("max_position_embeddings")
    if isinstance(longest, int) and not isinstance(longest, bool) and 2 <= longest < DEFAULT_MAX_SEQ_LEN:
        values["max_seq_len"] = longest
    if saved.is_file():
        # A checkpoint whose run settings predate `tokenization` was trained per step.
        values.update({"tokenization": LEGACY_TOKENIZATION, **read_config_file(saved)})
    own_tokenizer = checkpoint_tokenizer(checkpoint)  # resolved against the checkpoint, not the working directory
    if own_tokenizer:
        values["tokenizer_name_or_path"] = own_tokenizer
    inherited: list[str] = []
    for key in _INHERITED:
        if values.get(key) is not None:
            value = values[key] if isinstance(values[key], str) else json.dumps(values[key])
            inherited.append(f"--{key}={value}")  # one token: a value may itself start with "--"
    return load_config(None, [*inherited, "--bf16", "false", "--fp16", "false", "--model_name_or_path", checkpoint,
                              "--train_dataset_path", data, "--output_dir", str(Path(data).parent), *overrides])


def compute_dtype(config: RunConfig) -> str:
    return "bfloat16" if config.training.bf16 else "float16" if config.training.fp16 else "float32"


def refuse_context_parallelism(parallel: ParallelArguments) -> None:
    """Scoring splits records, not sequences, over ranks (see the README's long-trace section)."""
    if parallel.context_parallel_degree > 1:
        raise ConfigError(
            "score runs without context parallelism (context_parallel_degree 1): scoring keeps no activations "
            "for a backward pass, so a trace that needed CP to train fits one forward pass; split a model that "
            "does not fit with --tensor_parallel_degree or --pipeline_parallel_degree")


def score_file(config: RunConfig, output: Path, aggregates: tuple[str, ...], batch_size: int, packed: bool) -> Optional[dict]:
    """Score every record of ``config.data.train_dataset_path`` into ``output`` (JSONL, written
    atomically by one rank); returns a summary on that rank, None on the others."""
    refuse_context_parallelism(config.parallel)
    unknown = [how for how in aggregates if how not in AGGREGATES]
    if unknown:
        raise ConfigError(f"unknown aggregate(s) {', '.join(unknown)}; choose from {', '.join(AGGREGATES)}")
    data_path = config.data.train_dataset_path
    # Every record must be valid (no skip_invalid) and needs no labels.
    job = dataclasses.replace(tokenize_job(config, data_path), skip_invalid=False, require_labels=False)
    tokenizer = RecordTokenizer(job)
    arch = resolve_architecture(config.model, tokenizer.tokenizer.vocab_size, config.data.max_seq_len,
                                config.prm.reward_head, added_tokens=len(tokenizer.special.added))
    layout, _ = resolve_layout(config, int(os.environ.get("WORLD_SIZE", "1")), arch)
    runtime = init_runtime(config.training.device, config.training.seed, layout)
    options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu)
    chunks = build_model_chunks(arch, tokenizer.special.reward_ids, config.data.max_seq_len, options)
    load_model_weights(chunks, config.model.model_name_or_path, arch,
                       verify_checksums=config.training.verify_checkpoint_checksums)
    if config.training.bf16 or config.training.fp16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]

    parts = output.with_name(output.name + ".parts")
    store = TokenStore(tokenize_once(job, tokenizer, parts, show_progress=runtime.is_logging_rank))
    if runtime.is_logging_rank:
        print(f"scoring {plural(len(store), 'record')} in {compute_dtype(config)} on "
              f"{plural(runtime.world_size, runtime.device.type + ' process')}", file=sys.stderr, flush=True)
    packing = Packing("greedy_zero_padding", PackingOptions(config.data.max_seq_len, row_multiple=layout.sequence_multiple),
                      config.data.packing_buffer_size) if packed else None
    eos = tokenizer.tokenizer.eos_id
    collator = Collator(eos if eos is not None else 0,
                        multiple=layout.sequence_multiple, uniform_length=layout.pipeline_parallel_size > 1,
                        packing=packing.options if packing else None)
    result = predict(chunks, store, 1 if packed else batch_size, collator, runtime.device, packing,
                     show_progress=runtime.is_logging_rank, gather=False)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    writes = result is not None and parallel_state.get_tensor_model_parallel_rank() == 0
    if writes:
        _write_part(parts, dp_rank, dp_size, result[0])
    dist.barrier()
    summary = None
    if writes and dp_rank == 0:
        summary = _write_scores(data_path, output, _read_parts(parts, dp_size), aggregates, config.prm.process_reward)
        summary["dtype"] = compute_dtype(config)
        summary["data"] = store.meta["report"]
        shutil.rmtree(parts)
    dist.barrier()
    return summary


_PART = [("record", "<i8"), ("step", "<i8"), ("p_good", "<f8")]


def _part_path(parts: Path, rank: int, size: int) -> Path:
    return parts / f"scores-{rank:05d}-of-{size:05d}.npy"


def _write_part(parts: Path, rank: int, size: int, predictions) -> None:
    """This data-parallel rank's step scores, written whole or not at all."""
    table = np.empty(len(predictions.p_good), dtype=_PART)
    table["record"], table["step"], table["p_good"] = predictions.record_ids, predictions.step_ids, predictions.p_good
    tmp = _part_path(parts, rank, size).with_suffix(".tmp")
    with tmp.open("wb") as handle:
        np.save(handle, table)
    tmp.replace(_part_path(parts, rank, size))


def _read_parts(parts: Path, size: int) -> dict[int, dict[int, float]]:
    """The step scores of every record, from the parts of all data-parallel ranks."""
    by_record: dict[int, dict[int, float]] = defaultdict(dict)
    for rank in range(size):
        table = np.load(_part_path(parts, rank, size), allow_pickle=False)
        for record, step, p in zip(table["record"].tolist(), table["step"].tolist(), table["p_good"].tolist()):
            by_record[record][step] = p
    return by_record


def _write_scores(data_path: str, output: Path, by_record: dict[int, dict[int, float]],
                  aggregates: tuple[str, ...], process_reward: bool) -> dict:
    """Write each record's other fields with its scores. The records are read a second time, one at a time,
    rather than kept from tokenizing: only the scores stay in memory, whatever the file's size."""
    tmp = output.with_name(output.name + ".tmp")
    records = unscored = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for index, _, raw in iter_raw_records(data_path):
            steps = by_record.get(index, {})
            scores = [steps[i] for i in sorted(steps)]
            out = {k: v for k, v in raw.items() if k not in ("src", "tgt", "responses")}
            out["index"] = index
            out["num_steps"] = len(raw["responses"]) if isinstance(raw["responses"], list) else 1
            if process_reward:
                out["step_scores"] = scores
            else:
                out["outcome_score"] = scores[-1] if scores else None
            out["aggregates"] = {how: aggregate(scores, how) for how in aggregates}
            handle.write(strict_json.dumps(out, ensure_ascii=False) + "\n")
            records += 1
            unscored += not scores
    tmp.replace(output)
    all_scores = np.array([p for steps in by_record.values() for p in steps.values()])
    return {"output": str(output), "records": records, "unscored_records": unscored, "steps": int(all_scores.size),
            "mean_p_good": float(all_scores.mean()) if all_scores.size else None}
