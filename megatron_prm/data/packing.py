"""Packing samples into rows of at most ``max_seq_len`` tokens (pure functions of the lengths).

- ``zero_padding``: samples in arrival order; a row is closed when the next sample does not fit
  (next-fit).
- ``greedy_zero_padding``: best-fit decreasing over a buffer of samples: the buffer's samples, longest
  first, each go into the open row with the least room left that still holds them, else a new row.

A packed row is fed to Megatron-Core as one THD sequence: ``cu_seqlens`` (int32) delimits the samples,
position ids restart at 0 in each sample, and attention never crosses a boundary. Each sample can be
padded to a multiple (context parallelism needs 2 x CP), and the row to another (tensor parallelism
with sequence parallelism needs TP); the row's padding is counted in its last sample's padded length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

MODES = ("zero_padding", "greedy_zero_padding")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class PackingOptions:
    capacity: int  # tokens per row, at most max_seq_len
    sample_multiple: int = 1
    row_multiple: int = 1

    def padded(self, length: int) -> int:
        return round_up(length, self.sample_multiple)

    @property
    def usable_capacity(self) -> int:
        """The largest row length that stays a multiple of ``row_multiple``."""
        return self.capacity // self.row_multiple * self.row_multiple


def _check_fits(size: int, limit: int) -> None:
    if size > limit:
        raise ValueError(f"a sample of {size} tokens does not fit a packed row of {limit}")


def pack_in_order(items: Iterable[tuple[Any, int]], options: PackingOptions) -> Iterator[list[Any]]:
    """Next-fit over ``(item, length)`` pairs in their order; yields rows of items."""
    row: list[Any] = []
    used = 0
    limit = options.usable_capacity
    for item, length in items:
        size = options.padded(length)
        _check_fits(size, limit)
        if used + size > limit:
            yield row
            row, used = [], 0
        row.append(item)
        used += size
    if row:
        yield row


def pack_best_fit_decreasing(items: Sequence[tuple[Any, int]], options: PackingOptions) -> list[list[Any]]:
    """Best-fit decreasing over one buffer of ``(item, length)`` pairs; returns rows of items."""
    limit = options.usable_capacity
    rows: list[list[Any]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for item, length in sorted(items, key=lambda pair: -options.padded(pair[1])):
        size = options.padded(length)
        _check_fits(size, limit)
        slot = bisect.bisect_left(room, (size, -1))
        if slot < len(room):
            left, index = room.pop(slot)
            rows[index].append(item)
            left -= size
        else:
            index, left = len(rows), limit - size
            rows.append([item])
        if left > 0:
            bisect.insort(room, (left, index))
    return rows


def pack_greedy(items: Iterable[tuple[Any, int]], options: PackingOptions, buffer_size: int) -> Iterator[list[Any]]:
    """:func:`pack_best_fit_decreasing` over consecutive buffers of ``buffer_size`` items."""
    buffer: list[tuple[Any, int]] = []
    for pair in items:
        buffer.append(pair)
        if len(buffer) == buffer_size:
            yield from pack_best_fit_decreasing(buffer, options)
            buffer = []
    if buffer:
        yield from pack_best_fit_decreasing(buffer, options)


def pack(items: Iterable[tuple[Any, int]], mode: str, options: PackingOptions, buffer_size: int) -> Iterator[list[Any]]:
    if mode == "zero_padding":
        return pack_in_order(items, options)
    if mode == "greedy_zero_padding":
        return pack_greedy(items, options, buffer_size)
    raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class RowLayout:
    """Where each sample of a row lies: real and padded cumulative lengths (both start at 0)."""

    cu_seqlens: np.ndarray  # int32 [n + 1], cumulative real lengths
    cu_seqlens_padded: np.ndarray  # int32 [n + 1], cumulative padded lengths = offsets in the row
    length: int

    @classmethod
    def of(cls, lengths: Sequence[int], options: PackingOptions) -> "RowLayout":
        real = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        padded = np.concatenate([[0], np.cumsum([options.padded(n) for n in lengths])]).astype(np.int32)
        padded[-1] = round_up(int(padded[-1]), options.row_multiple)
        return cls(real, padded, int(padded[-1]))
