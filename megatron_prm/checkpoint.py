"""Model checkpoints in Megatron-Core's layout-independent ``torch_dist`` format.

``output_dir/iter_XXXXXXX/`` holds the sharded model state, the run's resolved config and the model
architecture (HF names, ``model_config.json``); the file ``output_dir/latest`` names the newest
complete one. Model weights load into any tensor/pipeline layout: Megatron-Core's sharded state dict
names every tensor by its global position. A checkpoint is written under a temporary name
and renamed when every rank has finished, and ``latest`` is replaced atomically after that, so an
interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.model.architecture import LlamaArchitecture

LATEST = "latest"
CONFIG_NAME = "run_config.json"
MODEL_CONFIG_NAME = "model_config.json"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def model_sharded_state_dict(model: list) -> dict:
    """The sharded state of the model chunks, without DDP / Float16Module wrappers (whose default
    sharded_state_dict would prefix every name with ``module.``)."""
    chunks = unwrap_model(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_model_checkpoint(model: list, output_dir: Path, step: int, config: RunConfig,
                          arch: LlamaArchitecture) -> Path:
    """Save the model weights of every rank; returns the checkpoint directory."""
    final = output_dir / checkpoint_name(step)
    staging = output_dir / (checkpoint_name(step) + ".tmp")
    is_writer = dist.get_rank() == 0
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), str(staging))
    dist.barrier()
    if is_writer:
        config.save(staging / CONFIG_NAME)
        (staging / MODEL_CONFIG_NAME).write_text(json.dumps({"model_type": "llama", **arch.to_hf_config()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _write_atomically(output_dir / LATEST, final.name + "\n")
    dist.barrier()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: itself, or the one its ``latest`` file names."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / ".metadata").is_file() or not (path / MODEL_CONFIG_NAME).is_file():
        raise ConfigError(f"{path} is not a megatron-prm checkpoint (no .metadata / {MODEL_CONFIG_NAME})")
    return path


def load_model_weights(chunks: list, path: str | Path) -> Path:
    """Load the weights of a checkpoint into this rank's (unwrapped) model chunks, whatever the layout
    it was saved under. Refuses a checkpoint whose tensors do not match the model's shapes."""
    checkpoint = resolve_checkpoint(path)
    requested = model_sharded_state_dict(chunks)
    try:
        loaded = dist_checkpointing.load(requested, str(checkpoint))
    except Exception as err:  # noqa: BLE001 - dist_checkpointing raises many kinds on a mismatch
        raise ConfigError(f"cannot load the model weights of {checkpoint}: {err}") from err
    for key, chunk in zip(requested, chunks):
        chunk.load_state_dict(loaded[key])
    return checkpoint
