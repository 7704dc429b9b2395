"""Reading and writing safetensors one tensor at a time.

The reader uses ``pread`` into a fresh buffer instead of memory-mapping the file, so a tensor that has
been converted and dropped leaves nothing resident (pages of a mapped file count towards the process's
resident memory until the kernel evicts them). The writer lays out every shard's header from the
tensors' names, dtypes and shapes before any data exists, then streams each tensor's bytes as it is
produced, in the planned order.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_prm.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class CheckpointFormatError(ConfigError):
    """An HF checkpoint that is incomplete or does not match its config."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    length: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({err})") from err
    base = 8 + header_len
    file_size = path.stat().st_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if base + end > file_size:
            raise CheckpointFormatError(f"{path}: truncated: tensor {name} ends at byte {base + end}, the file "
                                        f"has {file_size} bytes")
        entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, end - begin)
    return entries


class SafetensorsReader:
    """The tensors of an HF checkpoint directory: ``model.safetensors`` or shards named by an index."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointFormatError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        elif (directory / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise CheckpointFormatError(f"{directory} holds neither {SINGLE_NAME} nor {INDEX_NAME} "
                                        "(only safetensors checkpoints are read, never pickles)")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            self.entries.update(_read_header(directory / name))

    def names(self) -> set[str]:
        return set(self.entries)

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        buffer = torch.empty(entry.length, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with entry.file.open("rb", buffering=0) as handle:
            done = 0
            while done < entry.length:
                got = os.preadv(handle.fileno(), [view[done:]], entry.start + done)
                if got == 0:
                    raise CheckpointFormatError(f"{entry.file}: truncated in tensor {name}")
                done += got
        return buffer.view(entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes tensors, in a fixed planned order, into shards of at most ``max_shard_bytes``.

    One shard is written as ``model.safetensors``; more as ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, as transformers does.
    """

    def __init__(self, directory: Path, planned: list[PlannedTensor], max_shard_bytes: int,
                 metadata: Optional[dict[str, str]] = None) -> None:
        self.directory = directory
        self.metadata = metadata or {"format": "pt"}
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in planned:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        self.shards = shards
        count = len(shards)
        self.file_names = [SINGLE_NAME] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [t for shard in shards for t in shard]
        self._position = 0
        self._shard = -1
        self._handle = None
        self._remaining_in_shard = 0

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard += 1
        tensors = self.shards[self._shard]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._handle = (self.directory / self.file_names[self._shard]).open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._remaining_in_shard = len(tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._position]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        self._handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._remaining_in_shard -= 1
        self._position += 1

    def close(self) -> None:
        if self._position != len(self._order):
            raise ValueError(f"{len(self._order) - self._position} planned tensors were never written")
        if self._handle is not None:
            self._handle.close()
        if len(self.file_names) > 1:
            weight_map = {t.name: file for file, shard in zip(self.file_names, self.shards) for t in shard}
            total = sum(t.nbytes for t in self._order)
            (self.directory / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

