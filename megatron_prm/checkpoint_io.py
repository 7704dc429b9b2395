"""How a checkpoint's bytes reach storage and come back at cluster scale: fully parallel, gather-free and,
on request, asynchronous.

This is what Megatron-LM does for large runs (``--ckpt-fully-parallel-save``, ``--ckpt-fully-parallel-load``,
``--ckpt-assume-constant-structure``, ``--async-save``), with Megatron-Core's public strategies:

- Save: tensors replicated over data parallelism (the model weights; everything without the distributed
  optimizer) are written by one data-parallel rank each, chosen so that every rank writes about the same
  number of bytes (``FullyParallelSaveStrategyWrapper``); the distributed optimizer's ``dp_reshardable``
  state is written by the rank that holds it. Nothing is gathered: each rank writes only what it holds.
- The save plan is exchanged once and cached (the checkpoint's structure is the same at every save of a
  run), and the sharding-integrity validation, an all-gather of every rank's metadata, runs at the first
  save only.
- Load: each stored byte is read from storage by one data-parallel rank and exchanged over the network
  (``FullyParallelLoadStrategyWrapper``) instead of every replica reading it.
- ``async_save``: training stops only while the save is planned and the tensors are staged (a fork of
  the process on CPU, a copy to host memory on GPU); a background process writes the files, and the
  completion (manifest, publication, ``latest``, pruning) runs at a later step, on every rank at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from megatron_prm import megatron_compat


def _data_parallel_group():
    """The group over which a tensor's replicas are spread (data parallel, with context parallel), or
    None outside a Megatron layout (then the whole world)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


class CheckpointWriter:
    """Writes the checkpoints of one run; keeps the cached save plan from one save to the next.

    ``write`` returns once the files are written (synchronous) or staged (``async_save``); ``on_complete``
    runs on every rank once every rank's files are on storage. Call :meth:`poll` at every step (it completes
    finished asynchronous saves) and :meth:`wait` before the process ends or reads a checkpoint back.
    """

    def __init__(self, async_save: bool = False, constant_structure: bool = True) -> None:
        self.async_save = async_save
        base = get_default_save_sharded_strategy()
        base.use_cached_ckpt_structure = constant_structure
        self._strategy = FullyParallelSaveStrategyWrapper(base, _data_parallel_group(),
                                                          do_cache_distribution=constant_structure)
        self._constant_structure = constant_structure
        self._saved_before = False
        self._queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if async_save else None

    def write(self, sharded: dict, directory: Path, on_complete: Callable[[], None]) -> None:
        self.wait()  # one save in flight at a time: the previous one is published first
        validate = not (self._constant_structure and self._saved_before)
        options = megatron_compat.async_save_options() if self.async_save else {}
        request = dist_checkpointing.save(sharded, str(directory), sharded_strategy=self._strategy,
                                          validate_access_integrity=validate, async_sharded_save=self.async_save,
                                          preprocess_common_before_consistancy_check=_comparable_common, **options)
        self._saved_before = True
        if request is None:
            on_complete()
            return
        request.add_finalize_fn(on_complete)
        self._queue.schedule_async_request(request)

    @property
    def pending(self) -> bool:
        return self._queue is not None and self._queue.get_num_unfinalized_calls() > 0

    def poll(self) -> None:
        """Complete the asynchronous saves that every rank has finished writing (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until the asynchronous save in flight, if any, is written and completed (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)


def _comparable_common(common: dict) -> dict:
    """The common state that must agree across ranks: a fully reshardable optimizer state gathered on
    data-parallel rank 0 (``param_state``) is absent on the other ranks by design."""
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict) or "param_state" not in optimizer:
        return common
    return {**common, "optimizer": {k: v for k, v in optimizer.items() if k != "param_state"}}


def load_sharded(requested: dict, checkpoint: Path) -> dict:
    """``dist_checkpointing.load`` through the safe readers, each stored byte read by one data-parallel
    rank (replicas receive it from that rank)."""
    strategy = TorchDistLoadShardedStrategy()
    group = _data_parallel_group()
    if group is not None and dist.get_world_size(group) > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    return megatron_compat.load_dist_checkpoint(requested, checkpoint, strategy)
