"""What the trainer reads: the tokenizer, the training batches of every step, and the dev samples.

Training data comes from one of three places, chosen by ``train_dataset_path`` and ``lazy``:
a JSON/JSONL file tokenized at start (held in memory), a preprocessed store (memory-mapped), or, with
``lazy``, a JSONL stream tokenized on the fly. The first two give identical batches for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.data.batching import BatchLayout, TrainSchedule
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


class StreamedTrainBatches:
    """Consecutive samples of this rank's stream; steps must be asked for in order."""

    steps_per_epoch = None

    def __init__(self, stream: Iterator[Sample], layout: BatchLayout):
        self.stream = stream
        self.layout = layout
        self.next_step = 0

    def microbatches(self, step: int) -> list[list[Sample]]:
        if step != self.next_step:
            raise ValueError(f"a stream is read in order: step {self.next_step} comes next, not {step}")
        self.next_step += 1
        size = self.layout.micro_batch_size
        return [[next(self.stream) for _ in range(size)] for _ in range(self.layout.num_microbatches)]


@dataclass
class PreparedData:
    tokenizer: RecordTokenizer
    pad_id: int
    train: TrainBatches
    train_source: Optional[SampleSource]  # None when streaming
    dev: Optional[SampleSource]
    reports: dict


def tokenize_job(config: RunConfig, data_path: str) -> TokenizeJob:
    return TokenizeJob(
        data_path=data_path,
        tokenizer=config.model.tokenizer_name_or_path or "",
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


def prepare_data(config: RunConfig, tokenizer: RecordTokenizer, layout: BatchLayout, data_parallel_rank: int,
                 show_progress: bool) -> PreparedData:
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
        train: TrainBatches = StreamedTrainBatches(stream, layout)
        reports["train"] = {"streamed": config.data.train_dataset_path}
    else:
        train_source, reports["train"] = open_source(config, config.data.train_dataset_path, tokenizer, show_progress)
        train = IndexedTrainBatches(train_source, layout, data_parallel_rank, config.training.seed)
    dev = None
    if config.training.do_eval and config.data.dev_dataset_path:
        dev, reports["dev"] = open_source(config, config.data.dev_dataset_path, tokenizer, show_progress)
    eos = tokenizer.tokenizer.eos_id
    return PreparedData(tokenizer, eos if eos is not None else 0, train, train_source, dev, reports)
