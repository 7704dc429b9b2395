"""Writing a Megatron-Core ``torch_dist`` checkpoint one tensor chunk at a time.

``dist_checkpointing.save`` needs every tensor in memory before it writes; a converter would then
hold the whole model. Here each chunk is a recipe (shape, dtype, a function that produces it) and is
produced only when PyTorch's distributed-checkpoint writer reaches it, then dropped. The files are
the ones ``dist_checkpointing.save`` writes for one rank: ``.metadata``, ``__0_0.distcp``,
``metadata.json`` and ``common.pt``; Megatron-Core loads them into any parallel layout.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

MEGATRON_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1}


@dataclass(frozen=True)
class LazyChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class LazyTensor:
    """A global tensor of ``shape`` made of chunks that are produced on demand."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[LazyChunk, ...]

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(chunk.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)),
                    properties=TensorProperties(dtype=self.dtype),
                    size=torch.Size(self.shape),
                ),
            )
            for chunk in self.chunks
        ]

    def produce(self, offsets: torch.Size) -> torch.Tensor:
        for chunk in self.chunks:
            if torch.Size(chunk.offsets) == offsets:
                tensor = chunk.produce().to(self.dtype).contiguous()
                if tuple(tensor.shape) != chunk.sizes:
                    raise ValueError(f"chunk at {chunk.offsets} produced shape {tuple(tensor.shape)}, "
                                     f"planned {chunk.sizes}")
                return tensor
        raise KeyError(f"no chunk at {tuple(offsets)}")


class _StreamingSavePlanner(DefaultSavePlanner):
    """Resolves :class:`LazyTensor` chunks by producing them, one at a time, as the writer asks."""

    def __init__(self, on_chunk: Optional[Callable[[str], None]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.on_chunk = on_chunk

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        if not isinstance(obj, LazyTensor):
            return super().lookup_object(index)
        tensor = obj.produce(index.offset)
        if self.on_chunk is not None:
            self.on_chunk(index.fqn)
        return tensor


@contextlib.contextmanager
def single_process_dcp():
    """torch.distributed.checkpoint used by one process on purpose (``no_dist=True``): torch warns that it
    assumes exactly that on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        yield


def write_torch_dist(directory: Path, tensors: dict[str, LazyTensor],
                     on_chunk: Optional[Callable[[str], None]] = None) -> None:
    """Write ``tensors`` (checkpoint key -> lazy tensor) as a torch_dist checkpoint into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, sync_files=True)
    with single_process_dcp():
        dcp.save(tensors, storage_writer=writer, planner=_StreamingSavePlanner(on_chunk), no_dist=True)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(MEGATRON_BACKEND))


def stacked(shape: tuple[int, ...], dtype: torch.dtype, count: int,
            produce: Callable[[int], torch.Tensor]) -> LazyTensor:
    """``count`` tensors of ``shape`` stacked along a leading axis, as Megatron stores a transformer block's
    parameters (one chunk per layer) or, in a model of mixed layers, one layer's experts."""
    chunks = tuple(
        LazyChunk((index,) + (0,) * len(shape), (1,) + shape, lambda index=index: produce(index).unsqueeze(0))
        for index in range(count)
    )
    return LazyTensor((count,) + shape, dtype, chunks)


def stacked_experts(shape: tuple[int, ...], dtype: torch.dtype, layers: int, experts: int,
                    produce_expert: Callable[[int, int], torch.Tensor]) -> LazyTensor:
    """Per-expert tensors of ``shape`` stacked along a layer and an expert axis, as Megatron stores a MoE
    layer's experts (one chunk per layer and expert)."""
    chunks = tuple(
        LazyChunk((layer, expert) + (0,) * len(shape), (1, 1) + shape,
                  lambda layer=layer, expert=expert: produce_expert(layer, expert)[None, None])
        for layer in range(layers) for expert in range(experts)
    )
    return LazyTensor((layers, experts) + shape, dtype, chunks)


def whole(shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> LazyTensor:
    return LazyTensor(shape, dtype, (LazyChunk((0,) * len(shape), shape, produce),))
