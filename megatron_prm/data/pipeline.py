"""What the trainer reads: the tokenizer, the training batches of every step, and the dev samples.

Training data comes from one of three places, chosen by ``train_dataset_path`` and ``lazy``:
a JSON/JSONL file tokenized at start (held in memory), a preprocessed store (memory-mapped), or, with
``lazy``, a JSONL stream tokenized on the fly. The first two give identical batches for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

from megatron_prm.config import ConfigError, RunConfig
import numpy as np

from megatron_prm.data.batching import BatchLayout, TrainSchedule, eval_microbatches
from megatron_prm.data.packing import PackingOptions, pack, pack_best_fit_decreasing
from megatron_prm.data.preprocess import RecordTokenizer, TokenizeJob, store_identity
from megatron_prm.data.samples import Sample, SampleOptions, load_samples
from megatron_prm.data.store import InMemorySamples, TokenStore, store_prefix
from megatron_prm.data.streaming import StreamShard, stream_samples


class SampleSource(Protocol):
    """Random access to samples: :class:`InMemorySamples` or :class:`TokenStore`."""

    lengths: Sequence[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def good_share(self) -> float: ...


class TrainBatches(Protocol):
    """The samples of each microbatch of each optimizer step, for this data-parallel rank."""

    steps_per_epoch: Optional[int]

    def microbatches(self, step: int) -> list[list[Sample]]: ...


class IndexedTrainBatches:
    """A :class:`TrainSchedule` over a random-access source."""

    def __init__(self, source: SampleSource, layout: BatchLayout, data_parallel_rank: int, seed: int):
        self.source = source
        self.schedule = TrainSchedule(len(source), layout, data_parallel_rank, seed)
        self.steps_per_epoch = self.schedule.steps_per_epoch

    def microbatches(self, step: int) -> list[list[Sample]]:
        return [[self.source[int(i)] for i in indices] for indices in self.schedule.microbatches(step)]


@dataclass(frozen=True)
class Packing:
    mode: str
    options: PackingOptions
    buffer_size: int


class PackedTrainBatches:
    """Each epoch's shuffled samples packed into rows; a microbatch is one row.

    Every rank packs the whole epoch the same way (only the lengths are read), then takes its share of
    each global batch of ``num_microbatches x data_parallel_size`` rows. Epochs can differ in their
    number of rows, so steps are mapped to epochs by counting.
    """

    def __init__(self, source: SampleSource, layout: BatchLayout, data_parallel_rank: int, seed: int,
                 packing: Packing):
        self.source = source
        self.layout = layout
        self.rank = data_parallel_rank
        self.seed = seed
        self.packing = packing
        self._epoch_rows: dict[int, list[list[int]]] = {}
        self._epoch_steps: list[int] = []
        self.steps_per_epoch = self._steps_in(0)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self._rows(0))} packed rows are fewer than one global batch of "
                f"{layout.num_microbatches * layout.data_parallel_size} rows"
            )

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_rows:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            lengths = self.source.lengths
            rows = list(pack(((int(i), int(lengths[i])) for i in order), self.packing.mode, self.packing.options,
                             self.packing.buffer_size))
            if self.packing.mode == "greedy_zero_padding":
                np.random.default_rng([self.seed, epoch, 1]).shuffle(rows)
            self._epoch_rows = {epoch: rows}  # one epoch at a time
        return self._epoch_rows[epoch]

    def _steps_in(self, epoch: int) -> int:
        while len(self._epoch_steps) <= epoch:
            rows = len(self._rows(len(self._epoch_steps)))
            self._epoch_steps.append(rows // (self.layout.num_microbatches * self.layout.data_parallel_size))
        return self._epoch_steps[epoch]

    def microbatches(self, step: int) -> list[list[Sample]]:
        epoch = 0
        while step >= self._steps_in(epoch):
            step -= self._steps_in(epoch)
            epoch += 1
        per_rank = self.layout.num_microbatches
        start = step * per_rank * self.layout.data_parallel_size + self.rank * per_rank
        return [[self.source[i] for i in row] for row in self._rows(epoch)[start:start + per_rank]]


class StreamedTrainBatches:
    """Consecutive samples (or packed rows) of this rank's stream; steps must be asked for in order."""

    steps_per_epoch = None

    def __init__(self, stream: Iterator[Sample], layout: BatchLayout, packing: Optional[Packing] = None):
        if packing is not None:
            rows = pack(((sample, len(sample)) for sample in stream), packing.mode, packing.options,
                        packing.buffer_size)
            self.groups: Iterator[list[Sample]] = iter(rows)
        else:
            size = layout.micro_batch_size
            self.groups = iter(lambda: [next(stream) for _ in range(size)], None)
        self.layout = layout
        self.next_step = 0

    def microbatches(self, step: int) -> list[list[Sample]]:
        if step != self.next_step:
            raise ValueError(f"a stream is read in order: step {self.next_step} comes next, not {step}")
        self.next_step += 1
        return [next(self.groups) for _ in range(self.layout.num_microbatches)]

    def fast_forward(self, steps: int) -> None:
        """Skip the samples of ``steps`` steps (a resumed run re-reads the stream up to where it was)."""
        for step in range(self.next_step, steps):
            self.microbatches(step)


def eval_plan(source: SampleSource, micro_batch_size: int, packing: Optional[Packing], data_parallel_rank: int,
              data_parallel_size: int) -> list[list[int]]:
    """Sample indices of this rank's evaluation microbatches: length-sorted padded batches, or packed
    rows (best-fit decreasing over the whole set); dealt round-robin over data-parallel ranks."""
    if packing is None:
        return [list(map(int, b)) for b in eval_microbatches(source.lengths, micro_batch_size, data_parallel_rank,
                                                              data_parallel_size)]
    rows = pack_best_fit_decreasing([(i, int(n)) for i, n in enumerate(source.lengths)], packing.options)
    return rows[data_parallel_rank::data_parallel_size]


@dataclass
class PreparedData:
    tokenizer: RecordTokenizer
    pad_id: int
    train: TrainBatches
    train_source: Optional[SampleSource]  # None when streaming
    dev: Optional[SampleSource]
    reports: dict
    packing: Optional[Packing]


def tokenize_job(config: RunConfig, data_path: str) -> TokenizeJob:
    """The tokenization options of a run; the tokenizer defaults to the one the starting checkpoint carries."""
    from megatron_prm.checkpoint import checkpoint_tokenizer

    return TokenizeJob(
        data_path=data_path,
        tokenizer=config.model.tokenizer_name_or_path or checkpoint_tokenizer(config.model.model_name_or_path) or "",
        placeholder_token=config.prm.placeholder_token,
        reward_tokens=tuple(config.prm.reward_token_list),
        options=SampleOptions(config.data.max_seq_len, config.data.max_prompt_len, config.prm.process_reward),
        skip_invalid=config.data.skip_invalid,
    )


def open_source(config: RunConfig, path: str, tokenizer: RecordTokenizer, show_progress: bool) -> tuple[SampleSource, dict]:
    """A store (checked against this run's tokenizer and options) or a tokenized JSON/JSONL file."""
    job = tokenize_job(config, path)
    prefix = store_prefix(path)
    if prefix is not None:
        store = TokenStore(prefix)
        store.check_matches(store_identity(tokenizer.tokenizer, tokenizer.special, job))
        return store, {"store": str(prefix), **store.meta["report"]}
    samples, report = load_samples(path, tokenizer.tokenizer, tokenizer.special, job.options, job.reward_tokens,
                                   skip_invalid=job.skip_invalid, show_progress=show_progress)
    return InMemorySamples(samples), report.as_dict()


def packing_for(config: RunConfig, row_multiple: int) -> Optional[Packing]:
    """The run's packing, or None; rows hold at most max_seq_len tokens."""
    mode = config.data.packing_mode
    if mode is None:
        return None
    if config.training.per_device_train_batch_size != 1:
        raise ConfigError(
            f"with {mode} a micro batch is one packed row: set per_device_train_batch_size to 1 (got "
            f"{config.training.per_device_train_batch_size}) and raise gradient_accumulation_steps instead"
        )
    return Packing(mode, PackingOptions(config.data.max_seq_len, row_multiple=row_multiple),
                   config.data.packing_buffer_size)


def prepare_data(config: RunConfig, tokenizer: RecordTokenizer, layout: BatchLayout, data_parallel_rank: int,
                 show_progress: bool, row_multiple: int = 1) -> PreparedData:
    packing = packing_for(config, row_multiple)
    reports: dict = {}
    train_source: Optional[SampleSource] = None
    if config.data.lazy:
        if config.training.max_steps <= 0:
            raise ConfigError("lazy=True streams the data without counting it first: set max_steps")
        if store_prefix(config.data.train_dataset_path) is not None:
            raise ConfigError("lazy=True streams JSONL; a preprocessed store is already read lazily (set lazy=false)")
        shard = StreamShard(data_parallel_rank, layout.data_parallel_size, config.training.seed,
                            config.data.shuffle_buffer_size)
        stream = stream_samples(tokenize_job(config, config.data.train_dataset_path), shard,
                                config.data.dataloader_num_workers)
        train: TrainBatches = StreamedTrainBatches(stream, layout, packing)
        reports["train"] = {"streamed": config.data.train_dataset_path}
    else:
        train_source, reports["train"] = open_source(config, config.data.train_dataset_path, tokenizer, show_progress)
        if packing is not None:
            train = PackedTrainBatches(train_source, layout, data_parallel_rank, config.training.seed, packing)
        else:
            train = IndexedTrainBatches(train_source, layout, data_parallel_rank, config.training.seed)
    dev = None
    if config.training.do_eval and config.data.dev_dataset_path:
        dev, reports["dev"] = open_source(config, config.data.dev_dataset_path, tokenizer, show_progress)
    eos = tokenizer.tokenizer.eos_id
    return PreparedData(tokenizer, eos if eos is not None else 0, train, train_source, dev, reports, packing)
