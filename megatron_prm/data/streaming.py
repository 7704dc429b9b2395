"""``lazy: true``: stream JSONL records, tokenizing on the fly in DataLoader workers.

For data larger than memory. Each data-parallel rank reads a disjoint share of the records (record i
goes to reader ``i mod (data-parallel size x workers)``), and every tensor/pipeline rank of one replica
reads the same share. Only this reader's lines are parsed.

There is no global shuffle: samples pass through a shuffle buffer of ``shuffle_buffer_size`` samples
per reader (a seeded reservoir), so order is only mixed within that window; pre-shuffle the file (or
use a preprocessed store) where a global shuffle matters. The stream restarts at the end of the file
(the next epoch, with another buffer seed), so the number of steps must be given as ``max_steps``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_prm.data.preprocess import RecordTokenizer, TokenizeJob
from megatron_prm.data.records import is_json_array, iter_jsonl
from megatron_prm.data.samples import Sample


@dataclass(frozen=True)
class StreamShard:
    data_parallel_rank: int
    data_parallel_size: int
    seed: int
    shuffle_buffer_size: int


def _own_records(path: str, reader: int, readers: int) -> Iterator[tuple[int, int, object]]:
    """``(record index, line, parsed record)`` of the records that belong to ``reader``; a line that
    cannot be read comes as its RecordError (raised, or counted under skip_invalid, by the tokenizer)."""
    return iter_jsonl(path, lambda index: index % readers == reader)


class StreamingSamples(IterableDataset):
    """An endless stream of this reader's samples, epoch after epoch, through a shuffle buffer."""

    def __init__(self, job: TokenizeJob, shard: StreamShard):
        super().__init__()
        if is_json_array(job.data_path):
            raise ValueError(f"{job.data_path}: lazy=True streams JSONL; this file is a JSON array")
        self.job = job
        self.shard = shard

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.shard.data_parallel_rank * workers + worker
        readers = self.shard.data_parallel_size * workers
        tokenize = RecordTokenizer(self.job)
        epoch = 0
        while True:
            rng = random.Random(f"{self.shard.seed}/{epoch}/{reader}")
            buffer: list[Sample] = []
            records = _own_records(self.job.data_path, reader, readers)
            produced = 0
            for sample in tokenize.stream(records):
                produced += 1
                if len(buffer) < self.shard.shuffle_buffer_size:
                    buffer.append(sample)
                    continue
                slot = rng.randrange(len(buffer))
                buffer[slot], sample = sample, buffer[slot]
                yield sample
            if produced == 0:
                raise ValueError(f"{self.job.data_path}: reader {reader} of {readers} has no usable record")
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1


def stream_samples(job: TokenizeJob, shard: StreamShard, num_workers: int) -> Iterator[Sample]:
    """Samples of this data-parallel rank, tokenized in ``num_workers`` DataLoader processes."""
    dataset = StreamingSamples(job, shard)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        persistent_workers=num_workers > 0, collate_fn=_as_is)
    return iter(loader)


def _as_is(sample: Sample) -> Sample:
    """Samples stay numpy-backed; batches are collated by the trainer."""
    return sample
