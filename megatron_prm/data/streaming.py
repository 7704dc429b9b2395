"""``lazy: true``: stream JSONL records, tokenizing on the fly in DataLoader workers.

For data larger than memory. Each reader (data-parallel rank x DataLoader worker) reads only its own
byte range of the file: reader r of R owns the lines that start in ``[r * size / R, (r + 1) * size / R)``,
so an epoch reads the file about once over all readers, not once per reader. Every tensor/pipeline rank
of one replica reads the same share. A gzip file cannot be split by bytes: its readers share it by record
(record i goes to reader ``i mod R``), each decompressing the whole file.

Record indices and line numbers of a byte range are counted from the range's start; an error names the
record's index and line in the file, which only then are counted from the file's start.

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

from megatron_prm.config import ConfigError
from megatron_prm.data.preprocess import WORKER_START_METHOD, RecordTokenizer, TokenizeJob
from megatron_prm.data.records import (GZIP_ERRORS, RecordError, decode_line, is_json_array, open_data,
                                       parse_json_line, truncated_gzip)
from megatron_prm.data.samples import Sample
from megatron_prm.error_boundary import INPUT_ERRORS


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
    record: int = 0  # index of the first record at or after ``offset`` (counted from the range's start)
    line: int = 1  # line number at ``offset`` (counted from the range's start)
    taken: int = 0  # samples of the block already handed out


@dataclass(frozen=True)
class ReaderShare:
    """The lines one reader takes: of a plain file those starting in ``[start, end)``; of a gzip file
    (``end`` None) every ``readers``-th record from ``reader``."""

    reader: int
    readers: int
    start: int = 0
    end: Optional[int] = None

    @classmethod
    def of(cls, path: Path, reader: int, readers: int) -> "ReaderShare":
        if path.suffix == ".gz":
            return cls(reader, readers)
        size = path.stat().st_size
        return cls(reader, readers, size * reader // readers, size * (reader + 1) // readers)

    def owns(self, index: int) -> bool:
        return self.end is not None or index % self.readers == self.reader

    def first_line(self, handle) -> int:
        """The file position of the first line that starts in this share."""
        if self.start == 0:
            return 0
        handle.seek(self.start - 1)
        handle.readline()  # the rest of the line that holds byte start - 1 (its newline, at least)
        return handle.tell()


class _FilePlaces:
    """The record index and line number in the file of a line's byte offset, counted only for an error
    message (the one time a reader reads before its range); counting resumes where it last stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.offset, self.records, self.lines = 0, 0, 0

    def of(self, offset: int) -> tuple[int, int]:
        if offset < self.offset:
            self.offset, self.records, self.lines = 0, 0, 0
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            while self.offset < offset:
                data = handle.readline()
                self.offset += len(data)
                self.lines += 1
                self.records += bool(decode_line(data, self.lines)[0].strip())
        return self.records, self.lines + 1

    def in_file(self, err: RecordError, offset: int) -> RecordError:
        """``err`` (numbered from its range's start) about the record at ``offset``, numbered in the file."""
        index, line = self.of(offset)
        problem = err.problem
        if err.field == "<encoding>":  # its text names the line
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                problem = decode_line(handle.readline(), line)[1] or problem
        return RecordError(err.path, index, err.field, problem, line)


def _read_block(handle, path: str, start: ReaderPosition, share: ReaderShare,
                size: int) -> tuple[list[tuple[int, int, object]], dict[int, int], int, int]:
    """Up to ``size`` of this reader's ``(record index, line, parsed record)`` from ``start``, the byte
    offset of each of those records, and the record index and line number where the block ended. A line
    that cannot be read comes as its RecordError (raised, or counted under skip_invalid, by the tokenizer)."""
    handle.seek(start.offset)
    index, line_no, own, offsets = start.record, start.line, [], {}
    counted_from_file_start = share.start == 0
    try:
        while len(own) < size:
            line_start = handle.tell()
            if share.end is not None and line_start >= share.end:
                break
            data = handle.readline()
            if not data:
                break
            line_no += 1
            # A byte-order mark is dropped at the file's first line only (line 1 of a later range is not).
            text, fault = decode_line(data, line_no - 1 if counted_from_file_start else 0)
            if not text.strip():
                continue
            if share.owns(index):
                own.append((index, line_no - 1, parse_json_line(path, index, line_no - 1, text, fault)))
                offsets[index] = line_start
            index += 1
    except GZIP_ERRORS as err:
        raise truncated_gzip(Path(path), line_no, err) from None
    return own, offsets, index, line_no


@dataclass(frozen=True)
class WorkerFailure:
    """The error that stopped a DataLoader worker, sent to the training process as an item: raised in a
    worker, torch would re-raise it as a RuntimeError that quotes the worker's traceback."""

    error: BaseException


class StreamingSamples(IterableDataset):
    """An endless stream of this reader's ``(worker, position after the sample, sample)``, epoch after
    epoch, from the given start positions (one per DataLoader worker)."""

    def __init__(self, job: TokenizeJob, shard: StreamShard, starts: Optional[list[Optional[ReaderPosition]]] = None):
        super().__init__()
        if is_json_array(job.data_path):
            raise ConfigError(f"{job.data_path}: lazy=True streams JSONL; this file is a JSON array")
        self.job = job
        self.shard = shard
        self.starts = starts

    def __iter__(self) -> Iterator[tuple[int, ReaderPosition, Sample] | "WorkerFailure"]:
        if get_worker_info() is None:
            yield from self._samples()
            return
        try:
            yield from self._samples()
        except INPUT_ERRORS as err:  # a bad record or file: handed to the training process to report
            yield WorkerFailure(err)

    def _samples(self) -> Iterator[tuple[int, ReaderPosition, Sample]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.shard.data_parallel_rank * workers + worker
        readers = self.shard.data_parallel_size * workers
        path = Path(self.job.data_path)
        share = ReaderShare.of(path, reader, readers)
        places = _FilePlaces(path)
        tokenize = RecordTokenizer(self.job)
        with open_data(path) as handle:
            epoch_start = share.first_line(handle)
            start = self.starts[worker] if self.starts else None
            position = start if start is not None else ReaderPosition(offset=epoch_start)
            produced_in_epoch = position.offset > epoch_start or position.taken > 0
            while True:
                raw, offsets, next_record, next_line = _read_block(handle, self.job.data_path, position, share,
                                                                   self.shard.shuffle_buffer_size)
                end = handle.tell()
                if not raw:  # end of the share: the next epoch
                    if not produced_in_epoch:
                        raise ConfigError(f"{self.job.data_path}: reader {reader} of {readers} has no usable record")
                    position, produced_in_epoch = ReaderPosition(epoch=position.epoch + 1, offset=epoch_start), False
                    continue
                try:
                    samples = list(tokenize.stream(iter(raw)))
                except RecordError as err:
                    if share.start == 0 or err.index not in offsets:
                        raise
                    raise places.in_file(err, offsets[err.index]) from None
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
        # None: the worker has handed out nothing yet and starts at its share's first line.
        self.positions: list[Optional[ReaderPosition]] = [None] * max(1, num_workers)
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
            item = next(self._loader)
            if isinstance(item, WorkerFailure):
                raise item.error
            worker, position, sample = item
            self._early.setdefault(worker, []).append((position, sample))
        position, sample = self._early[wanted].pop(0)
        self.positions[wanted] = position
        self.next_worker = (wanted + 1) % len(self.positions)
        return sample

    def __iter__(self) -> "SampleStream":
        return self

    def state_dict(self) -> dict:
        return {"readers": self.shard.data_parallel_size * len(self.positions), "next_worker": self.next_worker,
                "sharding": "byte ranges",
                "positions": [dataclasses.asdict(p) if p is not None else None for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (before the first sample is read); the readers must be the same."""
        readers = self.shard.data_parallel_size * len(self.positions)
        if state["readers"] != readers:
            raise ConfigError(
                f"the stream was read by {state['readers']} readers (data-parallel size x dataloader_num_workers) "
                f"and this run has {readers}: a lazy stream resumes only with the same number of readers"
            )
        if state.get("sharding") != "byte ranges":
            raise ConfigError("the stream position was saved by a version whose readers each read the whole file; "
                              "readers now read byte ranges and cannot continue it (start a new run from the "
                              "checkpoint's weights with model_name_or_path)")
        assert self._loader is None, "load the stream position before reading"
        self.positions = [ReaderPosition(**p) if p is not None else None for p in state["positions"]]
        self.next_worker = int(state["next_worker"])


def _as_is(item):
    """Samples stay numpy-backed; batches are collated by the trainer."""
    return item
