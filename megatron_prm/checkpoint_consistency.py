"""A checkpoint's parts must agree before anything is loaded from it.

- Every storage path in ``.metadata`` names a file inside the checkpoint directory: a relative name without
  ``..``, never an absolute path, never a link out. Otherwise a crafted ``.metadata`` (with its manifest
  recomputed) would read another checkpoint's bytes, or any file's, as its own.
- Every stored tensor's chunks lie inside its declared size, do not overlap, cover it, and each has its
  bytes in the storage table: a ``.metadata`` whose shape contradicts its chunks would load as silent garbage
  (the uncovered part keeps whatever the model held).
- The model config's ``tie_word_embeddings`` agrees with the stored weights: a tied model stores no separate
  output layer.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from megatron_prm.run_directory import CheckpointError

OUTPUT_LAYER_KEY = "output_layer.weight"
_MAX_OVERLAP_CHECK = 64  # chunks per tensor compared pairwise (a tensor has one per model-parallel shard)


def check_storage_paths(storage_data: dict, checkpoint: Path) -> None:
    """Refuse a storage table naming a file outside ``checkpoint`` (``..``, absolute, a link out)."""
    root = Path(os.path.realpath(checkpoint))
    for index, info in storage_data.items():
        name = getattr(info, "relative_path", None)
        fqn = getattr(index, "fqn", index)
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{checkpoint}/.metadata: item {fqn} has no storage file name; refused")
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
            raise CheckpointError(f"{checkpoint}/.metadata: item {fqn} is stored at {name!r}, outside the checkpoint "
                                  "directory; refused")
        target = Path(os.path.realpath(root / name))
        if root not in target.parents:
            raise CheckpointError(f"{checkpoint}/.metadata: item {fqn} is stored at {name!r}, which leads out of the "
                                  f"checkpoint directory (to {target}); refused")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise CheckpointError(f"{checkpoint}/.metadata: item {fqn} has storage offset {offset!r} and length "
                                  f"{length!r}; refused")


def _overlap(a, b) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes))


def check_chunks(state_dict_metadata: dict, storage_data: dict, checkpoint: Path) -> None:
    """Refuse a tensor whose declared size its chunks do not tile exactly, or a chunk without stored bytes."""
    stored_chunks = {(getattr(index, "fqn", None), tuple(getattr(index, "offset", None) or ())) for index in storage_data}
    for fqn, item in state_dict_metadata.items():
        size, chunks = getattr(item, "size", None), getattr(item, "chunks", None)
        if size is None or chunks is None:
            continue  # a byte item (BytesStorageMetadata)
        where = f"{checkpoint}/.metadata: tensor {fqn}"
        shape = tuple(size)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has size {list(shape)}; refused")
        covered = 0
        for chunk in chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                    o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
                raise CheckpointError(f"{where}: a chunk at {list(offsets)} of {list(sizes)} lies outside its size "
                                      f"{list(shape)}; the metadata contradicts the stored chunks")
            if (fqn, offsets) not in stored_chunks and math.prod(sizes):
                raise CheckpointError(f"{where}: the chunk at {list(offsets)} has no stored bytes")
            covered += math.prod(sizes)
        if covered != math.prod(shape):
            raise CheckpointError(f"{where} has size {list(shape)} ({math.prod(shape)} elements) but its chunks hold "
                                  f"{covered}; the metadata contradicts the stored chunks")
        if len(chunks) <= _MAX_OVERLAP_CHECK and any(_overlap(a, b) for a, b in itertools.combinations(chunks, 2)):
            raise CheckpointError(f"{where}: two chunks overlap; the metadata contradicts the stored chunks")


def check_tied_embeddings(stored_keys: Iterable[str], tied: bool, checkpoint: Path, config_name: str) -> None:
    """Refuse a model config saying ``tie_word_embeddings`` over a checkpoint that stores a separate output
    layer. (Untied without an output layer is legitimate: a Qwen2.5-Math-PRM-style model has an MLP head and
    no LM head; the load refuses a missing output layer where the model needs one.)"""
    has_output_layer = any(key == OUTPUT_LAYER_KEY or key.endswith("." + OUTPUT_LAYER_KEY) for key in stored_keys)
    if tied and has_output_layer:
        raise CheckpointError(f"{checkpoint}/{config_name} says tie_word_embeddings true, but the checkpoint stores a "
                              f"separate {OUTPUT_LAYER_KEY}; the config and the weights disagree")
