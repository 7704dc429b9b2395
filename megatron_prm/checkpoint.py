"""Model checkpoints in Megatron-Core's layout-independent ``torch_dist`` format.

``output_dir/iter_XXXXXXX/`` holds the sharded model state and the run's resolved config; the file
``output_dir/latest`` names the newest complete one. A checkpoint is written under a temporary name
and renamed when every rank has finished, and ``latest`` is replaced atomically after that, so an
interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_prm.config import RunConfig

LATEST = "latest"
CONFIG_NAME = "run_config.json"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def model_sharded_state_dict(model: list) -> dict:
    if len(model) == 1:
        return {"model": model[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_model_checkpoint(model: list, output_dir: Path, step: int, config: RunConfig) -> Path:
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
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _write_atomically(output_dir / LATEST, final.name + "\n")
    dist.barrier()
    return final
