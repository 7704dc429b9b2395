"""Checkpoints in Megatron-Core's ``torch_dist`` format: save, exact resume, resharding, best model.

``output_dir/iter_XXXXXXX/`` holds, for every rank, the model, the optimizer (Adam moments, fp32 main
weights, loss scaler), the LR schedule, the RNG states, the training position and the resolved config,
plus ``model_config.json`` (the architecture, HF names) and ``train_state.json`` (a readable copy of the
position). The file ``output_dir/latest`` names the newest complete checkpoint.

Crash safety: a checkpoint is written under ``iter_XXXXXXX.tmp``, a ``manifest.json`` (sizes and CRC-32
of every file) is added, and it is published only after every rank has finished writing (run_directory.py: an
existing step is swapped atomically); old checkpoints of this run beyond ``save_total_limit`` are removed
only after that. A process killed at any moment leaves ``latest`` naming a complete checkpoint.

Layouts: every tensor is stored under its global name and offsets, so model weights load into any
tensor/pipeline/data-parallel layout. Optimizer state does too, except the distributed optimizer's
``dp_reshardable`` format (the default: written by every rank, nothing gathered), which only reshards over
data parallelism; ``megatron-prm reshard`` (reshard.py) rewrites such a checkpoint fully reshardable, and
``unified_checkpoint: true`` saves every checkpoint that way. How the bytes are written and read (fully
parallel, asynchronous on request) is checkpoint_io.py's job. A resume that cannot carry the optimizer
state over is refused before anything is loaded. Nothing read from a checkpoint runs code: ``.metadata``
goes through an allow-list unpickler, byte items and ``common.pt`` through ``torch.load(weights_only=True)``
(safe_loading.py), and the manifest is checked before anything is read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.utils import unwrap_model

from megatron_prm import megatron_compat
from megatron_prm.checkpoint_consistency import check_tied_embeddings
from megatron_prm.checkpoint_io import CheckpointWriter, load_sharded
from megatron_prm.checkpoint_manifest import (
    check_backend,
    raise_problems,
    rank_files,
    records_for,
    verify_checkpoint,
    write_manifest,
)
from megatron_prm.config import ConfigError, ModelArguments, RunConfig
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture, read_hf_config
from megatron_prm.run_directory import (
    MODEL_CONFIG_NAME,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    resolve_checkpoint,
    staging_dir,
)
from megatron_prm.safe_loading import SafeFileSystemReader, load_errors_named
from megatron_prm.tokenizer import save_tokenizer, save_with_special_tokens, tokenizer_beside

CONFIG_NAME = "run_config.json"
TRAIN_STATE_NAME = "train_state.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    best_metric: Optional[float] = None
    best_checkpoint: Optional[str] = None
    layout: dict = field(default_factory=dict)
    optimizer_format: str = ""
    data_position: dict = field(default_factory=dict)  # the batch source's state (megatron_prm.data.loader)
    skipped_nonfinite_steps: int = 0  # spent of max_skipped_nonfinite_steps: the budget spans resumes
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept on resume; pruning touches only its own

    @classmethod
    def from_dict(cls, values: dict, where: str = "train_state") -> "TrainState":
        """The state ``values`` describe, each field of its type; a wrong one is a :class:`CheckpointError`
        (a state read as defaults would restart the step count and re-save over earlier checkpoints)."""
        if not isinstance(values, dict):
            raise CheckpointError(f"{where} is a {type(values).__name__}, not a mapping of the training state")
        for name, kinds in _TRAIN_STATE_TYPES.items():
            value = values.get(name)
            if name in values and (isinstance(value, bool) or not isinstance(value, kinds)) \
                    or name in _TRAIN_STATE_COUNTS and isinstance(value, int) and value < 0:
                raise CheckpointError(f"{where}: field {name!r} is {value!r}, not {_TRAIN_STATE_KINDS[name]}")
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# The type of each TrainState field as stored (JSON and common.pt alike).
_TRAIN_STATE_TYPES = {"step": int, "consumed_samples": int, "best_metric": (int, float, type(None)),
                      "best_checkpoint": (str, type(None)), "layout": dict, "optimizer_format": str,
                      "data_position": dict, "skipped_nonfinite_steps": int, "run_id": str}
_TRAIN_STATE_COUNTS = ("step", "consumed_samples", "skipped_nonfinite_steps")
_TRAIN_STATE_KINDS = {"step": "a count", "consumed_samples": "a count", "best_metric": "a number or null",
                      "best_checkpoint": "a name or null", "layout": "a mapping", "optimizer_format": "a string",
                      "data_position": "a mapping", "skipped_nonfinite_steps": "a count", "run_id": "a string"}


def layout_record(layout: ParallelLayout) -> dict:
    return {"tensor": layout.tensor_parallel_size, "context": layout.context_parallel_size,
            "pipeline": layout.pipeline_parallel_size, "virtual_pipeline": layout.virtual_pipeline_parallel_size,
            "data": layout.data_parallel_size, "distributed_optimizer": layout.distributed_optimizer}


def saved_layout(saved: TrainState) -> dict:
    """The layout a checkpoint was saved under (one written before context parallelism had CP 1)."""
    return {"context": 1, **saved.layout}


def model_sharded_state_dict(model: list) -> dict:
    """The sharded state of the model chunks, without DDP / Float16Module wrappers (whose default
    sharded_state_dict would prefix every name with ``module.``)."""
    chunks = unwrap_model(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def optimizer_format(distributed_optimizer: bool, unified: bool) -> str:
    """How the optimizer state is laid out in the checkpoint."""
    if not distributed_optimizer:
        return "model_space"  # per-parameter state keyed like the model: reshards freely
    return "fully_reshardable" if unified else "dp_reshardable"


def _optimizer_metadata(fmt: str) -> dict:
    # fully_reshardable (unified_checkpoint, reshard) gathers the state on data-parallel rank 0 over gloo
    # instead of on every rank: one gathered copy instead of one per rank.
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": True,
            "distrib_optim_fully_reshardable_mem_efficient": True}


# ----------------------------------------------------------------------------------------- RNG state


def _rng_state() -> dict:
    """This rank's RNG states as plain values (bytes, ints, lists: loadable with weights_only=True, and
    free of tensors, which the fully parallel load exchanges between ranks by pickling)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].astype(np.uint32).tobytes(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": _bytes(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {name: _bytes(state) for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _bytes(state: torch.Tensor) -> bytes:
    return state.cpu().numpy().tobytes()


def _byte_tensor(state: bytes | torch.Tensor) -> torch.Tensor:
    """A generator state as torch wants it (earlier checkpoints stored tensors)."""
    return state if isinstance(state, torch.Tensor) else torch.frombuffer(bytearray(state), dtype=torch.uint8)


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.frombuffer(keys, dtype=np.uint32).copy()
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: _byte_tensor(value) for name, value in state["tracker"].items()})


def _rng_sharded_object(data: Optional[dict]) -> ShardedObject:
    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# ---------------------------------------------------------------------------------------------- save


def checkpoint_tokenizer(path: Optional[str]) -> Optional[str]:
    """The tokenizer directory a checkpoint carries (one converted from HF, or saved by a run), if any."""
    if not path:
        return None
    directory = resolve_checkpoint(path) / TOKENIZER_DIR
    return str(directory) if directory.is_dir() else None


def run_tokenizer(model: ModelArguments) -> Optional[str]:
    """The tokenizer a run uses: tokenizer_name_or_path, else the one its starting checkpoint carries, else
    the one of the HF model its model_config names."""
    return (model.tokenizer_name_or_path or checkpoint_tokenizer(model.model_name_or_path)
            or tokenizer_beside(model.model_config))


def _base_hf_config(config: RunConfig) -> dict:
    """The HF config the model started from (kept so that an export restores every field of it)."""
    if config.model.model_name_or_path:
        return json.loads((resolve_checkpoint(config.model.model_name_or_path) / MODEL_CONFIG_NAME).read_text())
    if config.model.model_config:
        return read_hf_config(config.model.model_config)
    return {"model_type": "llama"}


def _write_metadata(directory: Path, config: RunConfig, arch: Architecture, train_state: TrainState) -> None:
    # The tokenizer training used (the config's wins over the starting checkpoint's) with the step tag and
    # reward tokens it added, kept in the checkpoint and named relative to it, so that the checkpoint can move.
    tokenizer = run_tokenizer(config.model)
    if tokenizer:
        save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
        save_with_special_tokens(directory / TOKENIZER_DIR, config.prm.placeholder_token, config.prm.reward_token_list)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, tokenizer_name_or_path=TOKENIZER_DIR))
    config.save(directory / CONFIG_NAME)
    model_config = {**_base_hf_config(config), **arch.to_hf_config()}
    model_config.pop("rope_parameters", None)  # superseded by rope_theta / rope_scaling just written
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps(model_config, indent=2))
    (directory / TRAIN_STATE_NAME).write_text(json.dumps(dataclasses.asdict(train_state), indent=2))


def _save(sharded: dict, output_dir: Path, step: int, write_metadata, writer: CheckpointWriter,
          after_publish: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``sharded`` into the staging directory of ``step``; once every rank's files are on storage
    (at once, or later with an asynchronous writer) seal it with the metadata and manifest and publish it,
    then ``after_publish(final)`` on every rank. Returns the final path."""
    staging = staging_dir(output_dir, step)
    is_writer = dist.get_rank() == 0
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    final = output_dir / checkpoint_name(step)

    def complete() -> None:
        # Every rank checksums the files it wrote while they are still in its page cache.
        records: list = [None] * dist.get_world_size()
        dist.all_gather_object(records, records_for(staging, rank_files(staging, dist.get_rank())))
        if is_writer:
            write_metadata(staging)
            write_manifest(staging, {name: record for part in records for name, record in part.items()})
            publish_checkpoint(staging)
        dist.barrier()
        if after_publish is not None:
            after_publish(final)

    writer.write(sharded, staging, complete)
    return final


def save_model_checkpoint(model: list, output_dir: Path, step: int, config: RunConfig,
                          arch: Architecture) -> Path:
    """Model weights only (initial checkpoints, exports); loadable with ``model_name_or_path``."""
    return _save(model_sharded_state_dict(model), output_dir, step,
                 lambda d: _write_metadata(d, config, arch, TrainState(step=step)),
                 CheckpointWriter(constant_structure=False))


def save_checkpoint(state, output_dir: Path, config: RunConfig, arch: Architecture,
                    train_state: TrainState, writer: CheckpointWriter, keep: Optional[int] = None,
                    on_published: Optional[Callable[[Path], None]] = None) -> Path:
    """Everything a resume needs (``state`` is the TrainingState), written by ``writer``; once published,
    prunes beyond ``keep`` and calls ``on_published(path)``. ``train_state`` is copied: the step may go on
    while an asynchronous save is written."""
    train_state = copy.deepcopy(train_state)
    model_sd = model_sharded_state_dict(state.model)
    sharded = {
        **model_sd,
        "optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=_optimizer_metadata(train_state.optimizer_format)),
        "rng_state": _rng_sharded_object(_rng_state()),
        "scheduler": state.scheduler.state_dict(),
        "train_state": dataclasses.asdict(train_state),
    }

    def after_publish(final: Path) -> None:
        if keep is not None and dist.get_rank() == 0:
            prune_checkpoints(output_dir, keep, own=run_steps(output_dir, train_state.run_id),
                              protect=[train_state.best_checkpoint])
        dist.barrier()
        if on_published is not None:
            on_published(final)

    return _save(sharded, output_dir, train_state.step, lambda d: _write_metadata(d, config, arch, train_state),
                 writer, after_publish)


def run_steps(output_dir: Path, run_id: str) -> list[int]:
    """The steps of the checkpoints in ``output_dir`` that run ``run_id`` wrote."""
    steps = []
    for step, path in checkpoints(output_dir).items():
        try:
            saved = json.loads((path / TRAIN_STATE_NAME).read_text())
        except (OSError, ValueError):
            continue  # not a checkpoint of this run that we can vouch for: never pruned
        if isinstance(saved, dict) and saved.get("run_id") == run_id:
            steps.append(step)
    return steps


# ---------------------------------------------------------------------------------------------- load


def check_integrity(checkpoint: Path, checksums: bool = True) -> None:
    """Refuse a checkpoint whose files differ from its manifest or whose storage format is not torch_dist,
    naming the file. With several processes each recomputes a share of the checksums."""
    distributed = dist.is_available() and dist.is_initialized()
    share = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    problems = verify_checkpoint(checkpoint, checksums, share)
    if distributed:
        gathered: list = [None] * share[1]
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for part in gathered for p in part})
    raise_problems(problems)
    check_backend(checkpoint)


def check_architecture(checkpoint: Path, arch: Architecture) -> None:
    """Refuse a checkpoint of another model shape, naming the fields that differ."""
    path = checkpoint / MODEL_CONFIG_NAME
    saved = Architecture.from_hf_config(read_hf_config(path), str(path)).to_hf_config()
    current = arch.to_hf_config()
    # The vocabulary may grow by added special tokens; the reward head is checked when the model is resolved.
    differences = [f"{k}: checkpoint {saved.get(k)!r}, model {v!r}" for k, v in current.items()
                   if k not in ("initializer_range", "max_position_embeddings", "architectures")
                   and saved.get(k) != v and not (k == "vocab_size" and v > saved[k])]
    if differences:
        raise ConfigError(f"{checkpoint} holds a model of another shape ({'; '.join(differences)})")


def _load(requested: dict, checkpoint: Path, what: str) -> dict:
    with load_errors_named(checkpoint, what):
        return load_sharded(requested, checkpoint)


def load_model_weights(chunks: list, path: str | Path, arch: Optional[Architecture] = None,
                       verify_checksums: bool = True) -> Path:
    """Load a checkpoint's weights into this rank's model chunks, whatever the layout it was saved
    under."""
    checkpoint = resolve_checkpoint(path)
    check_integrity(checkpoint, verify_checksums)
    if arch is not None:
        check_architecture(checkpoint, arch)
    requested = model_sharded_state_dict(chunks)
    reader = SafeFileSystemReader(checkpoint)
    stored = set(reader.read_metadata().state_dict_metadata)
    tied = read_hf_config(checkpoint / MODEL_CONFIG_NAME).get("tie_word_embeddings", False)
    check_tied_embeddings(stored, bool(tied), checkpoint, MODEL_CONFIG_NAME)
    absent_extra_state = _drop_absent_extra_state(requested, stored)
    fresh_head = _drop_absent_reward_head(requested, stored)
    loaded = _load(requested, checkpoint, "the model weights")
    for key, chunk in zip(requested, unwrap_model(chunks)):
        result = chunk.load_state_dict(loaded[key], strict=not (absent_extra_state or fresh_head))
        missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")
                   and not (fresh_head and k.startswith(MLP_HEAD_PREFIX))]
        if missing or getattr(result, "unexpected_keys", []):
            raise ConfigError(f"{checkpoint}: missing {missing}, unexpected {result.unexpected_keys}")
    return checkpoint


# The MLP reward head's parameters (reward_head: mlp); a causal-LM checkpoint has none.
MLP_HEAD_PREFIX = "mlp_reward_head."


def _drop_absent_reward_head(sharded: dict, stored: set[str]) -> bool:
    """Remove the MLP reward head from the request when the checkpoint holds none of it (a causal LM, or a
    PRM with the LM-head classifier, started as an MLP-head PRM): the head keeps its initialisation.
    A checkpoint holding only part of the head is refused by the load like any other missing tensor."""
    head = [value for value in _flat_values(sharded)
            if isinstance(value, ShardedTensor) and value.key.startswith(MLP_HEAD_PREFIX)]
    if not head or any(value.key in stored for value in head):
        return False
    _remove(sharded, set(map(id, head)))
    return True


def _flat_values(sharded: dict):
    for value in sharded.values():
        if isinstance(value, dict):
            yield from _flat_values(value)
        else:
            yield value


def _remove(sharded: dict, ids: set[int]) -> None:
    for name, value in list(sharded.items()):
        if isinstance(value, dict):
            _remove(value, ids)
        elif id(value) in ids:
            del sharded[name]


def _drop_absent_extra_state(sharded: dict, stored: set[str]) -> bool:
    """Remove the ``_extra_state`` objects (Transformer Engine's FP8 metadata; None in the local spec)
    that a checkpoint does not hold, as one converted from HF does not; the modules keep theirs."""
    dropped = False
    for name, value in list(sharded.items()):
        if isinstance(value, dict):
            dropped |= _drop_absent_extra_state(value, stored)
        elif isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and value.unique_key not in stored:
            del sharded[name]
            dropped = True
    return dropped


def read_train_state(checkpoint: Path) -> TrainState:
    path = checkpoint / TRAIN_STATE_NAME
    if not path.is_file():
        raise ConfigError(f"{checkpoint} has no {TRAIN_STATE_NAME}: it holds model weights only, not a "
                          "training state to resume (use model_name_or_path to start from its weights)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from err
    return TrainState.from_dict(values, str(path))


DISTRIBUTED_FORMATS = ("dp_reshardable", "fully_reshardable")


def check_optimizer_format(checkpoint: Path, saved: TrainState, fmt: str, layout: ParallelLayout) -> None:
    """Refuse, before anything is read, a resume whose optimizer state cannot be carried over."""
    if saved.optimizer_format != fmt and not {saved.optimizer_format, fmt} <= set(DISTRIBUTED_FORMATS):
        # measured: model_space <-> the distributed optimizer's formats fails inside Megatron
        raise ConfigError(
            f"{checkpoint} stores the optimizer state as {saved.optimizer_format!r} but this run uses "
            f"{fmt!r}; resume with the same sharding setting, or start from its weights with model_name_or_path"
        )
    model_parallel = {k: v for k, v in saved_layout(saved).items() if k != "data"}
    if saved.optimizer_format == "dp_reshardable" and model_parallel != {
            k: v for k, v in layout_record(layout).items() if k != "data"}:
        raise ConfigError(
            f"{checkpoint} stores the distributed optimizer's state in the dp_reshardable format, which only "
            f"reshards over data parallelism: saved under {saved_layout(saved)}, this run is {layout_record(layout)}. "
            f"Convert it first: `torchrun --nproc-per-node N -m megatron_prm reshard {checkpoint} --output-dir "
            "NEW_RUN` (N a multiple of its tensor x context x pipeline size) writes it fully reshardable; then resume from "
            "NEW_RUN under any layout. Or start from its weights with model_name_or_path"
        )


def load_checkpoint(state, path: str | Path, arch: Architecture, layout: ParallelLayout,
                    fmt: str, verify_checksums: bool = True) -> tuple[TrainState, Path]:
    """Restore model, optimizer, LR schedule and (same layout only) RNG states for a resume."""
    checkpoint = resolve_checkpoint(path)
    check_integrity(checkpoint, verify_checksums)
    check_architecture(checkpoint, arch)
    saved = read_train_state(checkpoint)
    if not saved.optimizer_format:
        raise ConfigError(f"{checkpoint} holds model weights only; start from it with model_name_or_path")
    same_layout = saved_layout(saved) == layout_record(layout)
    check_optimizer_format(checkpoint, saved, fmt, layout)
    model_sd = model_sharded_state_dict(state.model)
    megatron_compat.prime_adam_state(state.optimizer)
    requested = {  # read in the format it was saved in; the run saves in its own from then on
        **model_sd,
        "optimizer": state.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                        metadata=_optimizer_metadata(saved.optimizer_format)),
    }
    if same_layout:
        requested["rng_state"] = _rng_sharded_object(None)
    loaded = _load(requested, checkpoint, "the training state")
    with load_errors_named(checkpoint, "the training state"):  # a state that loaded but does not fit
        for key, chunk in zip(model_sd, unwrap_model(state.model)):
            chunk.load_state_dict(loaded[key])
        state.optimizer.load_state_dict(loaded["optimizer"])
        state.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"].data if hasattr(loaded["rng_state"], "data") else loaded["rng_state"])
    resumed = TrainState.from_dict(loaded["train_state"], f"{checkpoint}/common.pt train_state")
    if resumed.step != saved.step or checkpoint_step(checkpoint.name) not in (None, resumed.step):
        raise CheckpointError(f"{checkpoint}: common.pt says step {resumed.step}, {TRAIN_STATE_NAME} step {saved.step}; "
                              "the checkpoint disagrees with itself (a resume would re-save over other checkpoints)")
    return resumed, checkpoint
