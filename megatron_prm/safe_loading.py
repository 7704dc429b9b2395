"""Reading torch distributed checkpoints without running code from the files.

PyTorch's ``FileSystemReader`` reads ``.metadata`` with ``pickle.load`` and its default load planner reads
every byte item with an unrestricted ``torch.load`` (weights_only off): a crafted checkpoint runs
whatever it likes.
:class:`SafeFileSystemReader` reads ``.metadata`` with an unpickler that builds only the classes DCP
metadata is made of (listed below; read from what torch 2.13 and 2.14 write) and reads byte items with
``torch.load(weights_only=True)``; anything else is refused with one error naming the file.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_prm.checkpoint_consistency import check_chunks, check_storage_paths
from megatron_prm.run_directory import CheckpointError

# (module, name) pairs that ``.metadata`` legitimately references, as written by torch 2.13 and 2.14
# (with and without Megatron-Core 0.16 / 0.19 on top): the metadata dataclasses, the save plan kept in
# planner_data, torch's layout look-up and pathlib paths (constructing one runs nothing). torch.Size and the dtypes are handled in find_class.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    # _StoragePrefix (one string) travels in the SavePlans that a cached-structure save stores
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    # StorageMeta.checkpoint_id: the directory a checkpoint was saved to, as a path (dcp.save(no_dist=True))
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, torch sizes, dtypes and layouts, and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which DCP metadata never holds")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which DCP metadata never does")


def load_metadata(path: Path) -> Metadata:
    """A DCP ``.metadata`` file, read with the allow-list unpickler."""
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except Exception as err:  # noqa: BLE001 - truncation, garbage or a refused class: all one verdict
        raise CheckpointError(f"{path} is not valid checkpoint metadata (refused to read it: {err})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def load_plain(source: Any, where: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only; one error naming ``where``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{where} is missing") from err
    except Exception as err:  # noqa: BLE001
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"{where} holds more than tensors and plain values, or is damaged; refused to "
                              f"load it ({reason[:300]})") from err


class _SafeBytesPlanner:
    """Hands the wrapped load planner only byte items that passed ``weights_only=True``.

    The planner itself unpickles byte items with weights_only off; it receives a fresh serialisation
    of the safely loaded value instead of the file's bytes, so it never sees a byte the file chose.
    """

    def __init__(self, planner, reader: "SafeFileSystemReader") -> None:
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        stored = self._reader.storage_data[read_item.storage_index]
        where = f"{Path(self._reader.path) / stored.relative_path} (item {read_item.storage_index.fqn})"
        safe = io.BytesIO()
        torch.save(load_plain(value, where), safe)
        safe.seek(0)
        self._planner.load_bytes(read_item, safe)


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata and byte items are read without running code, whose storage
    paths stay inside the checkpoint and whose tensor chunks tile their sizes (checkpoint_consistency.py);
    cached."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not supported")
        if self._metadata is None:
            metadata = load_metadata(Path(self.path) / ".metadata")
            check_storage_paths(metadata.storage_data, Path(self.path))
            check_chunks(metadata.state_dict_metadata, metadata.storage_data, Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _SafeBytesPlanner(planner, self))


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it wraps: chained exceptions and the per-rank failures of torch's DCP."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        for failure in getattr(current, "failures", {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


@contextlib.contextmanager
def load_errors_named(checkpoint: Path, what: str) -> Iterator[None]:
    """Turn whatever a load raises (torch's DCP wraps errors per rank in a BaseException) into one
    :class:`CheckpointError`: ours where one was raised inside, else one naming ``checkpoint``."""
    try:
        yield
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - loaders raise many kinds
        causes = list(_causes(err))
        ours: Optional[CheckpointError] = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise CheckpointError(str(ours)) from err
        innermost = next((c for c in reversed(causes) if not isinstance(c, CheckpointException)), err)
        text = str(innermost).strip().splitlines()
        raise CheckpointError(f"cannot load {what} of {checkpoint}: "
                              f"{text[0] if text else type(innermost).__name__}") from err
