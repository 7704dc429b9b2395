"""One epoch's packed rows as two flat arrays, computed once, cached as a file and read by slices.

:func:`epoch_plan` gives the same rows as :func:`megatron_prm.data.packing.pack` over the epoch's
permutation (tested against it), from the lengths alone: padding, the stable longest-first order of
each buffer, row boundaries and the grouping of samples into rows are numpy operations; the one loop
left per sample (best fit: the open row with the least room that still holds it) works on plain ints.

A :class:`PlanCache` keeps each plan in one ``.npy`` file named by the digest of everything that decides
it (the store's sidecar, seed, epoch, row capacity and multiples, mode, buffer size), written atomically
by whichever process builds it first. Readers memory-map the file and touch only the rows they take, so
a data-parallel rank's start-up and memory do not grow with the data set.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, overload

import numpy as np

from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.store import META_SUFFIX

PLAN_VERSION = 1


@dataclass(frozen=True)
class PackingPlan:
    """Rows of sample indices: row ``k`` is ``samples[row_starts[k]:row_starts[k + 1]]``."""

    row_starts: np.ndarray  # int64 [rows + 1]
    samples: np.ndarray  # int64 [samples in rows]

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self[0:len(self)])

    @overload
    def __getitem__(self, rows: int) -> list[int]: ...

    @overload
    def __getitem__(self, rows: slice) -> list[list[int]]: ...

    def __getitem__(self, rows):
        if not isinstance(rows, slice):
            row = range(len(self))[rows]  # an IndexError past the end, as a list's
            return np.asarray(self.samples[self.row_starts[row]:self.row_starts[row + 1]]).tolist()
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("a packing plan is read by consecutive rows")
        bounds = np.asarray(self.row_starts[start:stop + 1])
        if len(bounds) < 2:
            return []
        flat = np.asarray(self.samples[bounds[0]:bounds[-1]]).tolist()
        cuts = (bounds - bounds[0]).tolist()
        return [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _padded_sizes(lengths: np.ndarray, options: PackingOptions) -> np.ndarray:
    sizes = -(-np.asarray(lengths, dtype=np.int64) // options.sample_multiple) * options.sample_multiple
    too_long = np.flatnonzero(sizes > options.usable_capacity)
    if too_long.size:
        raise ValueError(f"a sample of {int(sizes[too_long[0]])} tokens does not fit a packed row of "
                         f"{options.usable_capacity}")
    return sizes


def _next_fit(sizes: np.ndarray, limit: int) -> np.ndarray:
    """Row starts of next-fit packing: each row ends before the first sample that would overflow it."""
    ends = np.concatenate([[0], np.cumsum(sizes)])
    starts, start = [0], 0
    while start < len(sizes):
        start = int(np.searchsorted(ends, ends[start] + limit, side="right")) - 1
        starts.append(start)
    return np.asarray(starts, dtype=np.int64)


def _best_fit_rows(sizes: list[int], limit: int) -> list[int]:
    """The row of each item (given longest first) under best fit; rows numbered in order of opening.
    Open rows are kept as sorted ints ``room * scale + row``, so that the lowest key with room >= size is
    the fullest row that holds the item, the earliest-opened on ties (as ``pack_best_fit_decreasing``)."""
    scale = len(sizes) + 1
    room: list[int] = []
    rows_of, opened = [], 0
    for size in sizes:
        slot = bisect.bisect_left(room, size * scale)
        if slot < len(room):
            key = room.pop(slot)
            row, left = key % scale, key // scale - size
        else:
            row, left, opened = opened, limit - size, opened + 1
        rows_of.append(row)
        if left > 0:
            bisect.insort(room, left * scale + row)
    return rows_of


def _best_fit_decreasing(order: np.ndarray, sizes: np.ndarray, limit: int,
                         buffer_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of each buffer: (row lengths in samples, samples in row order), buffer after buffer."""
    counts, members = [], []
    for start in range(0, len(order), buffer_size):
        buffer_sizes = sizes[start:start + buffer_size]
        longest_first = np.argsort(-buffer_sizes, kind="stable")  # sorted()'s stable order of the same key
        rows_of = np.asarray(_best_fit_rows(buffer_sizes[longest_first].tolist(), limit), dtype=np.int64)
        by_row = np.argsort(rows_of, kind="stable")  # each row's samples in the order they were placed
        members.append(order[start:start + buffer_size][longest_first][by_row])
        counts.append(np.bincount(rows_of))
    return counts, members


def best_fit_plan(lengths: np.ndarray, options: PackingOptions) -> PackingPlan:
    """Best-fit decreasing over all samples at once, in index order: the rows of
    ``pack_best_fit_decreasing(list(enumerate(lengths)), options)``."""
    order = np.arange(len(lengths), dtype=np.int64)
    counts, members = _best_fit_decreasing(order, _padded_sizes(lengths, options), options.usable_capacity,
                                           max(len(order), 1))
    row_lengths = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    return PackingPlan(np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
                       np.concatenate(members) if members else order)


def epoch_plan(lengths: np.ndarray, seed: int, epoch: int, mode: str, options: PackingOptions,
               buffer_size: int) -> PackingPlan:
    """The rows of one epoch: the permutation drawn from ``(seed, epoch)`` packed as ``mode`` packs it;
    greedy rows are then shuffled with ``(seed, epoch, 1)``, so long and short rows mix over steps."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).astype(np.int64)
    sizes = _padded_sizes(np.asarray(lengths)[order], options)
    if mode == "zero_padding":
        return PackingPlan(_next_fit(sizes, options.usable_capacity), order)
    if mode != "greedy_zero_padding":
        raise ValueError(f"packing mode must be one of zero_padding, greedy_zero_padding, got {mode!r}")
    counts, members = _best_fit_decreasing(order, sizes, options.usable_capacity, buffer_size)
    row_lengths = np.concatenate(counts)
    grouped = np.concatenate(members)
    starts = np.concatenate([[0], np.cumsum(row_lengths)])
    shuffled = np.arange(len(row_lengths))
    np.random.default_rng([seed, epoch, 1]).shuffle(shuffled)  # the same draws as shuffling the list of rows
    spans = [grouped[starts[k]:starts[k + 1]] for k in shuffled]
    return PackingPlan(np.concatenate([[0], np.cumsum(row_lengths[shuffled])]).astype(np.int64),
                       np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class PlanKey:
    """Everything an epoch's rows depend on."""

    store: str  # digest of the store's sidecar (a rebuilt store has a new one)
    seed: int
    epoch: int
    mode: str
    capacity: int
    sample_multiple: int
    row_multiple: int
    buffer_size: int

    def digest(self) -> str:
        text = json.dumps({"plan_version": PLAN_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class PlanCache:
    """Plans of one store in a directory, one file per :class:`PlanKey`: ``int64 [1 + rows + 1 + samples]``
    holding the row count, the row starts and the sample indices."""

    def __init__(self, directory: Path, store: str):
        self.directory = Path(directory)
        self.store = store  # the store's digest, part of every key

    @classmethod
    def beside(cls, prefix: Path, fallback: Path) -> "PlanCache":
        """The plans of the store at ``prefix``: in ``<prefix>.plans/`` beside it, or under ``fallback``
        where the store's directory is read-only (a shared data set)."""
        prefix = Path(prefix)
        parent = prefix.parent if os.access(prefix.parent, os.W_OK) else Path(fallback)
        return cls(parent / f"{prefix.name}.plans", store_digest(Path(f"{prefix}{META_SUFFIX}")))

    def path(self, key: PlanKey) -> Path:
        return self.directory / f"plan-{key.digest()}.npy"

    def load(self, key: PlanKey) -> Optional[PackingPlan]:
        path = self.path(key)
        if not path.is_file():
            return None
        flat = np.load(path, mmap_mode="r", allow_pickle=False)
        rows = int(flat[0])
        return PackingPlan(flat[1:rows + 2], flat[rows + 2:])

    def load_or_build(self, key: PlanKey, build: Callable[[], PackingPlan]) -> PackingPlan:
        found = self.load(key)
        if found is not None:
            return found
        plan = build()
        self.directory.mkdir(parents=True, exist_ok=True)
        flat = np.concatenate([[len(plan)], plan.row_starts, plan.samples]).astype(np.int64)
        handle, tmp = tempfile.mkstemp(dir=self.directory, prefix=".plan-", suffix=".tmp")
        try:
            os.fchmod(handle, 0o644)
            with os.fdopen(handle, "wb") as out:
                np.save(out, flat)
            os.replace(tmp, self.path(key))  # a reader sees the whole plan or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        loaded = self.load(key)
        assert loaded is not None
        return loaded


def store_digest(meta_path: Path) -> str:
    """Which build of a store this is: the digest of its sidecar (written last, unique per build)."""
    return hashlib.sha256(Path(meta_path).read_bytes()).hexdigest()[:24]
