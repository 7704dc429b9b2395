"""The training batches of every step, and where the data stands: one batch source per kind of data.

- :class:`IndexedBatches`: a random-access source (tokenized file or preprocessed store); each epoch is
  a fresh permutation drawn from ``(seed, epoch)``.
- :class:`PackedBatches`: the same permutation packed into rows (one row per microbatch); epochs pack
  to different row counts, and each epoch's own count is used. With a :class:`PlanCache` each epoch's
  rows are computed once for the whole job and every rank memory-maps them, reading only its own rows.
- :class:`StreamedBatches`: a lazy JSONL stream (:mod:`megatron_prm.data.streaming`).

Each hands out the next global batch's share of this data-parallel rank with :meth:`next_microbatches`
and keeps its place in the data as ``state_dict()`` / ``load_state_dict()``, as torchtitan's and
Megatron-LM's samplers do. The place is counted in samples (or packed rows) into the current epoch, not in
steps, so a run resumed under another data-parallel size or global batch continues exactly where the
data stopped: every sample of an epoch is trained on once, and the last incomplete global batch of an
epoch is left out, as Megatron does. A global batch is ``micro_batch_size x num_microbatches x
data_parallel_size`` samples (rows, with packing); data-parallel rank r takes its r-th contiguous share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

from megatron_prm.config import ConfigError
from megatron_prm.data.batching import BatchLayout
from megatron_prm.data.packing import PackingOptions, pack
from megatron_prm.data.packing_plan import PackingPlan, PlanCache, PlanKey, epoch_plan
from megatron_prm.data.samples import Sample
from megatron_prm.data.streaming import SampleStream
from megatron_prm.progress import plural


class SampleSource(Protocol):
    """Random access to samples: :class:`InMemorySamples` or :class:`TokenStore`."""

    lengths: Sequence[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def good_share(self) -> float: ...


@dataclass(frozen=True)
class Packing:
    mode: str
    options: PackingOptions
    buffer_size: int


class BatchSource(Protocol):
    """This rank's microbatches of each optimizer step, in order, and the position in the data."""

    epoch_ended: bool  # the last batch handed out was the last whole one of its epoch

    def next_microbatches(self) -> list[list[Sample]]: ...

    def steps_for_epochs(self, epochs: float) -> Optional[int]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _EpochBatches:
    """Consecutive global batches over a sequence of units (sample indices or packed rows) per epoch."""

    kind = ""

    def __init__(self, layout: BatchLayout, data_parallel_rank: int, seed: int):
        self.layout = layout
        self.rank = data_parallel_rank
        self.seed = seed
        self.epoch = 0
        self.position = 0  # units of the current epoch already handed out, over all ranks
        self.epoch_ended = False
        self._cached: Optional[tuple[int, list]] = None

    # Subclasses: the units of an epoch, units per rank and step, and how a unit becomes a microbatch.
    def _build_units(self, epoch: int) -> list: ...

    def _per_rank(self) -> int: ...

    def _microbatches(self, units: list) -> list[list[Sample]]: ...

    def _units(self, epoch: int) -> list:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build_units(epoch))  # one epoch at a time
        return self._cached[1]

    def _global(self) -> int:
        return self._per_rank() * self.layout.data_parallel_size

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._units(epoch)) // self._global()

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps of ``epochs`` epochs (a fraction of the last one rounded up) at this global batch."""
        whole, fraction = int(epochs), epochs - int(epochs)
        steps = sum(self.steps_in_epoch(e) for e in range(whole))
        if fraction > 0:
            steps += math.ceil(fraction * self.steps_in_epoch(whole))
        return max(1, steps)

    def next_microbatches(self) -> list[list[Sample]]:
        size = self._global()
        if self.position + size > len(self._units(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
            if size > len(self._units(self.epoch)):
                raise ConfigError(f"epoch {self.epoch} has {len(self._units(self.epoch))} {self.unit_name}, fewer "
                                  f"than one global batch of {size}")
        units = self._units(self.epoch)
        start = self.position + self.rank * self._per_rank()
        mine = units[start:start + self._per_rank()]
        self.position += size
        self.epoch_ended = self.position + size > len(units)
        return self._microbatches(mine)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epoch": self.epoch, "position": self.position, "epoch_ended": self.epoch_ended}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError(f"the checkpoint's data position is for {state.get('kind')!r} batches, this run reads "
                              f"{self.kind!r} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.epoch_ended = bool(state["epoch_ended"])


class IndexedBatches(_EpochBatches):
    """Shuffled samples of a random-access source; the position counts samples into the epoch."""

    kind = "indexed"
    unit_name = "samples"

    def __init__(self, source: SampleSource, layout: BatchLayout, data_parallel_rank: int, seed: int):
        super().__init__(layout, data_parallel_rank, seed)
        self.source = source
        if len(source) < layout.global_batch_size:
            raise ConfigError(
                f"{plural(len(source), 'training sample')} {'is' if len(source) == 1 else 'are'} fewer than one "
                f"global batch of "
                f"{layout.global_batch_size} (micro batch {layout.micro_batch_size} x "
                f"{plural(layout.num_microbatches, 'micro batch')} x {layout.data_parallel_size} data-parallel "
                "ranks): add data, or lower per_device_train_batch_size or gradient_accumulation_steps"
            )

    def _build_units(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        indices = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(indices)

    def _per_rank(self) -> int:
        return self.layout.micro_batch_size * self.layout.num_microbatches

    def _microbatches(self, units) -> list[list[Sample]]:
        mb = self.layout.micro_batch_size
        return [[self.source[int(i)] for i in units[k * mb:(k + 1) * mb]] for k in range(self.layout.num_microbatches)]


class PackedBatches(_EpochBatches):
    """Each epoch's shuffled samples packed into rows; a microbatch is one row, and the position counts
    rows into the epoch. The rows come from ``plans`` (one file per epoch, shared by all ranks) when
    given, else each instance packs the epoch itself (only the lengths are read)."""

    kind = "packed"
    unit_name = "packed rows"

    def __init__(self, source: SampleSource, layout: BatchLayout, data_parallel_rank: int, seed: int,
                 packing: Packing, plans: Optional[PlanCache] = None):
        super().__init__(layout, data_parallel_rank, seed)
        self.source = source
        self.packing = packing
        self.plans = plans
        if self.steps_in_epoch(0) == 0:
            rows = len(self._units(0))
            raise ConfigError(
                f"the training data packs into {plural(rows, 'row')} of {packing.options.capacity} tokens, fewer "
                f"than one global batch of {self._global()} rows ({plural(layout.num_microbatches, 'micro batch')} "
                f"x {layout.data_parallel_size} data-parallel ranks): add data, or lower gradient_accumulation_steps "
                "or max_seq_len")

    def _build_units(self, epoch: int) -> PackingPlan:
        packing = self.packing

        def build() -> PackingPlan:
            return epoch_plan(self.source.lengths, self.seed, epoch, packing.mode, packing.options, packing.buffer_size)

        if self.plans is None:
            return build()
        options = packing.options
        key = PlanKey(self.plans.store, self.seed, epoch, packing.mode, options.capacity, options.sample_multiple,
                      options.row_multiple, packing.buffer_size)
        return self.plans.load_or_build(key, build)

    def epochs_for_steps(self, steps: int) -> int:
        """How many epochs (from the first) ``steps`` optimizer steps reach into."""
        epoch, covered = 0, 0
        while covered < steps:
            in_epoch = self.steps_in_epoch(epoch)
            if in_epoch == 0:
                break  # next_microbatches refuses such an epoch when it gets there
            covered, epoch = covered + in_epoch, epoch + 1
        return max(epoch, 1)

    def _per_rank(self) -> int:
        return self.layout.num_microbatches

    def _microbatches(self, units) -> list[list[Sample]]:
        return [[self.source[i] for i in row] for row in units]


class StreamedBatches:
    """Consecutive samples (or packed rows) of this rank's stream. Its position is the stream's (each
    reader's file position); with packing, the stream position before the samples not yet handed out
    in a row, and how many rows of the current packing buffer were handed out."""

    epoch_ended = False

    def __init__(self, stream: SampleStream, layout: BatchLayout, packing: Optional[Packing] = None):
        self.stream = stream
        self.layout = layout
        self.packing = packing
        self._rows: Iterator[list[Sample]] = iter(())
        self._buffer_start = stream.state_dict()  # stream position before the current packing buffer
        self._rows_taken = 0

    def steps_for_epochs(self, epochs: float) -> None:
        return None  # a stream is not counted in advance

    def _next_row(self) -> list[Sample]:
        row = next(self._rows, None)
        if row is None:
            self._buffer_start, self._rows_taken = self.stream.state_dict(), 0
            size = self.packing.buffer_size
            buffer = [next(self.stream) for _ in range(size)]
            self._rows = iter(pack(((s, len(s)) for s in buffer), self.packing.mode, self.packing.options, size))
            row = next(self._rows)
        self._rows_taken += 1
        return row

    def next_microbatches(self) -> list[list[Sample]]:
        if self.packing is not None:
            return [self._next_row() for _ in range(self.layout.num_microbatches)]
        size = self.layout.micro_batch_size
        return [[next(self.stream) for _ in range(size)] for _ in range(self.layout.num_microbatches)]

    def state_dict(self) -> dict:
        if self.packing is None:
            return {"kind": "streamed", "stream": self.stream.state_dict()}
        return {"kind": "streamed", "stream": self._buffer_start, "rows_taken": self._rows_taken}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streamed":
            raise ConfigError(f"the checkpoint's data position is for {state.get('kind')!r} batches, this run "
                              "streams (lazy)")
        self.stream.load_state_dict(state["stream"])
        if self.packing is not None:
            for _ in range(int(state["rows_taken"])):
                self._next_row()
