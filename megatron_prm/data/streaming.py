"""``lazy: true``: stream JSONL records, tokenizing on the fly in DataLoader workers.

For data larger than memory. Each data-parallel rank reads a disjoint share of the records (record i
goes to reader ``i mod (data-parallel size x workers)``), and every tensor/pipeline rank of one replica
reads the same share. Only this reader's lines are parsed.

There is no global shuffle: each reader cuts its records into consecutive blocks of
``shuffle_buffer_size`` records and shuffles within a block (seeded by seed, epoch, reader and block),
so order is only mixed within that window; pre-shuffle the file (or use a preprocessed store) where a
global shuffle matters. The stream restarts at the end of the file (the next epoch), so the number of
steps must be given as ``max_steps``.

A reader's place is a :class:`ReaderPosition` (the file position of its current block and how many of
that block's samples it has handed out): a resumed run seeks there and re-reads at most one block
instead of everything consumed before.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_prm.data.preprocess import WORKER_START_METHOD, RecordTokenizer, TokenizeJob
from megatron_prm.data.records import (GZIP_ERRORS, decode_line, is_json_array, open_data, parse_json_line,
                                       truncated_gzip)
from megatron_prm.data.samples import Sample


@dataclass(frozen=True)
class StreamShard:
    data_parallel_rank: int
    data_parallel_size: int
    seed: int
    shuffle_buffer_size: int


@dataclass(frozen=True)
class ReaderPosition:
    """Where one reader stands: the block it is in and how many of its samples were handed out."""

    epoch: int = 0
    offset: int = 0  # file position (``tell()``) of the block's first line
    record: int = 0  # index of the first record at or after ``offset``
    line: int = 1  # line number at ``offset`` (for error messages)
    taken: int = 0  # samples of the block already handed out


def _read_block(handle, path: str, start: ReaderPosition, reader: int, readers: int,
                size: int) -> tuple[list[tuple[int, int, object]], int, int]:
    """Up to ``size`` of this reader's ``(record index, line, parsed record)`` from ``start``; also the
    record index and line number where the block ended. A line that cannot be read comes as its
    RecordError (raised, or counted under skip_invalid, by the tokenizer)."""
    handle.seek(start.offset)
    index, line_no, own = start.record, start.line, []
    try:
        while len(own) < size:
            data = handle.readline()
            if not data:
                break
            line_no += 1
            text, fault = decode_line(data, line_no - 1)
            if not text.strip():
                continue
            if index % readers == reader:
                own.append((index, line_no - 1, parse_json_line(path, index, line_no - 1, text, fault)))
            index += 1
    except GZIP_ERRORS as err:
        raise truncated_gzip(Path(path), line_no, err) from None
    return own, index, line_no


class StreamingSamples(IterableDataset):
    """An endless stream of this reader's ``(worker, position after the sample, sample)``, epoch after
    epoch, from the given start positions (one per DataLoader worker)."""

    def __init__(self, job: TokenizeJob, shard: StreamShard, starts: Optional[list[ReaderPosition]] = None):
        super().__init__()
        if is_json_array(job.data_path):
            raise ValueError(f"{job.data_path}: lazy=True streams JSONL; this file is a JSON array")
        self.job = job
        self.shard = shard
        self.starts = starts

    def __iter__(self) -> Iterator[tuple[int, ReaderPosition, Sample]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.shard.data_parallel_rank * workers + worker
        readers = self.shard.data_parallel_size * workers
        position = self.starts[worker] if self.starts else ReaderPosition()
        tokenize = RecordTokenizer(self.job)
        produced_in_epoch = position.offset > 0 or position.taken > 0
        with open_data(Path(self.job.data_path)) as handle:
            while True:
                raw, next_record, next_line = _read_block(handle, self.job.data_path, position, reader, readers,
                                                          self.shard.shuffle_buffer_size)
                end = handle.tell()
                if not raw:  # end of the file: the next epoch
                    if not produced_in_epoch:
                        raise ValueError(f"{self.job.data_path}: reader {reader} of {readers} has no usable record")
                    position, produced_in_epoch = ReaderPosition(epoch=position.epoch + 1), False
                    continue
                samples = list(tokenize.stream(iter(raw)))
                random.Random(f"{self.shard.seed}/{position.epoch}/{reader}/{position.record}").shuffle(samples)
                for taken in range(position.taken + 1, len(samples) + 1):
                    produced_in_epoch = True
                    yield worker, dataclasses.replace(position, taken=taken), samples[taken - 1]
                position = ReaderPosition(position.epoch, end, next_record, next_line, 0)


class SampleStream:
    """This data-parallel rank's samples in a fixed order (DataLoader workers taken in turn), with a
    position that can be saved and resumed: each worker's :class:`ReaderPosition` and whose turn it is."""

    def __init__(self, job: TokenizeJob, shard: StreamShard, num_workers: int):
        self.job = job
        self.shard = shard
        self.num_workers = num_workers
        self.positions = [ReaderPosition() for _ in range(max(1, num_workers))]
        self.next_worker = 0
        self._loader: Optional[Iterator] = None
        self._early: dict[int, list] = {}  # samples that arrived before their worker's turn

    def __next__(self) -> Sample:
        if self._loader is None:
            dataset = StreamingSamples(self.job, self.shard, list(self.positions))
            workers = {"num_workers": self.num_workers, "persistent_workers": True,
                       "multiprocessing_context": WORKER_START_METHOD} if self.num_workers else {}
            self._loader = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, **workers))
        wanted = self.next_worker
        while not self._early.get(wanted):
            worker, position, sample = next(self._loader)
            self._early.setdefault(worker, []).append((position, sample))
        position, sample = self._early[wanted].pop(0)
        self.positions[wanted] = position
        self.next_worker = (wanted + 1) % len(self.positions)
        return sample

    def __iter__(self) -> "SampleStream":
        return self

    def state_dict(self) -> dict:
        return {"readers": self.shard.data_parallel_size * len(self.positions), "next_worker": self.next_worker,
                "positions": [dataclasses.asdict(p) for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (before the first sample is read); the readers must be the same."""
        readers = self.shard.data_parallel_size * len(self.positions)
        if state["readers"] != readers:
            raise ValueError(
                f"the stream was read by {state['readers']} readers (data-parallel size x dataloader_num_workers) "
                f"and this run has {readers}: a lazy stream resumes only with the same number of readers"
            )
        assert self._loader is None, "load the stream position before reading"
        self.positions = [ReaderPosition(**p) for p in state["positions"]]
        self.next_worker = int(state["next_worker"])


def _as_is(item):
    """Samples stay numpy-backed; batches are collated by the trainer."""
    return item
