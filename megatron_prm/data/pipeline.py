"""What the trainer reads: the tokenizer, the training batches of every step, and the dev samples.

Training data comes from one of three places, chosen by ``train_dataset_path`` and ``lazy``:
a JSON/JSONL file, tokenized once into a store in ``output_dir/data_cache`` (see
:mod:`megatron_prm.data.store_cache`), a preprocessed store, or, with ``lazy``, a JSONL stream tokenized
on the fly. The first two are the same from then on: every rank opens the store, and packed rows come
from plans built once per epoch beside it (:mod:`megatron_prm.data.packing_plan`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_prm.config import DEFAULT_TOKENIZATION, LEGACY_TOKENIZATION, ConfigError, RunConfig, read_config_file
from megatron_prm.data.batching import BatchLayout, eval_microbatches
from megatron_prm.data.loader import BatchSource, IndexedBatches, PackedBatches, Packing, SampleSource, StreamedBatches
from megatron_prm.data.one_rank import on_rank_zero
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.packing_plan import PlanCache, best_fit_plan
from megatron_prm.data.preprocess import RecordTokenizer, TokenizeJob, store_identity
from megatron_prm.data.samples import SampleOptions, load_samples
from megatron_prm.data.store import InMemorySamples, TokenStore, store_prefix
from megatron_prm.data.store_cache import tokenize_once
from megatron_prm.data.streaming import SampleStream, StreamShard


def eval_plan(source: SampleSource, micro_batch_size: int, packing: Optional[Packing], data_parallel_rank: int,
              data_parallel_size: int) -> list[list[int]]:
    """Sample indices of this rank's evaluation microbatches: length-sorted padded batches, or packed
    rows (best-fit decreasing over the whole set); dealt round-robin over data-parallel ranks."""
    if packing is None:
        return [list(map(int, b)) for b in eval_microbatches(source.lengths, micro_batch_size, data_parallel_rank,
                                                              data_parallel_size)]
    plan = best_fit_plan(source.lengths, packing.options)
    return plan[0:len(plan)][data_parallel_rank::data_parallel_size]


@dataclass
class PreparedData:
    tokenizer: RecordTokenizer
    pad_id: int
    train: BatchSource
    train_source: Optional[SampleSource]  # None when streaming
    dev: Optional[SampleSource]
    reports: dict
    packing: Optional[Packing]


def tokenize_job(config: RunConfig, data_path: str) -> TokenizeJob:
    """The tokenization options of a run; the tokenizer defaults to the one the starting checkpoint carries,
    then to the one of the HF model model_config names."""
    from megatron_prm.checkpoint import run_tokenizer

    return TokenizeJob(
        data_path=data_path,
        tokenizer=run_tokenizer(config.model) or "",
        placeholder_token=config.prm.placeholder_token,
        reward_tokens=tuple(config.prm.reward_token_list),
        options=SampleOptions(config.data.max_seq_len, config.data.max_prompt_len, config.prm.process_reward,
                              config.data.apply_chat_template, config.data.system_prompt,
                              config.data.tokenization or DEFAULT_TOKENIZATION),
        skip_invalid=config.data.skip_invalid,
    )


def with_tokenization(config: RunConfig, resume_source: Optional[str]) -> RunConfig:
    """``config`` with its tokenization settled: a resumed run keeps the mode its checkpoint was trained with
    (per_step for checkpoints that predate the setting) and refuses another; a new run takes the one asked
    for, else the default."""
    from megatron_prm.checkpoint import CONFIG_NAME, resolve_checkpoint

    asked = config.data.tokenization
    if resume_source is None:
        mode = asked or DEFAULT_TOKENIZATION
    else:
        saved = resolve_checkpoint(resume_source) / CONFIG_NAME
        mode = (read_config_file(saved) if saved.is_file() else {}).get("tokenization") or LEGACY_TOKENIZATION
        if asked is not None and asked != mode:
            raise ConfigError(f"tokenization {asked!r}: the checkpoint resumed from ({saved.parent}) was trained with "
                              f"{mode!r}; a resume keeps it (leave tokenization unset, or start a new run)")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenization=mode))


def data_cache_dir(config: RunConfig) -> Path:
    """Where a run keeps the stores of its data files and the packing plans of read-only stores."""
    return Path(config.training.output_dir) / "data_cache"


def open_source(config: RunConfig, path: str, tokenizer: RecordTokenizer, show_progress: bool,
                cache_dir: Optional[Path] = None) -> tuple[SampleSource, dict]:
    """A store (checked against this run's tokenizer and options), or a JSON/JSONL file: with
    ``cache_dir`` tokenized once into a store there (or found there, built by an earlier start), else
    tokenized into memory."""
    job = tokenize_job(config, path)
    prefix = store_prefix(path)
    if prefix is None and cache_dir is not None:
        prefix = tokenize_once(job, tokenizer, cache_dir, show_progress)
    if prefix is not None:
        store = TokenStore(prefix)
        store.check_matches(store_identity(tokenizer.tokenizer, tokenizer.special, job))
        return store, {"store": str(prefix), **store.meta["report"]}
    samples, report = load_samples(path, tokenizer.tokenizer, tokenizer.special, job.options, job.reward_tokens,
                                   skip_invalid=job.skip_invalid, show_progress=show_progress)
    return InMemorySamples(samples), report.as_dict()


def packing_for(config: RunConfig, row_multiple: int, sample_multiple: int = 1) -> Optional[Packing]:
    """The run's packing, or None; rows hold at most max_seq_len tokens, each sample padded to a multiple
    of ``sample_multiple`` (2 x CP under context parallelism), each row to one of ``row_multiple``."""
    mode = config.data.packing_mode
    if mode is None:
        return None
    return Packing(mode, PackingOptions(config.data.max_seq_len, sample_multiple=sample_multiple, row_multiple=row_multiple),
                   config.data.packing_buffer_size)


def packed_batches(config: RunConfig, source: SampleSource, layout: BatchLayout, data_parallel_rank: int,
                   packing: Packing) -> PackedBatches:
    """Packed rows of a store from plans built once: global rank 0 builds every epoch's plan that the run
    reaches (``max_steps`` or ``num_train_epochs``) while the others wait, then each rank reads its rows."""
    if not isinstance(source, TokenStore):
        return PackedBatches(source, layout, data_parallel_rank, config.training.seed, packing)
    seed = config.training.seed

    def build_plans() -> PlanCache:
        plans = PlanCache.beside(source.prefix, data_cache_dir(config))
        batches = PackedBatches(source, layout, 0, seed, packing, plans)
        if config.training.max_steps > 0:
            batches.epochs_for_steps(config.training.max_steps)
        else:
            batches.steps_for_epochs(config.training.num_train_epochs)
        return plans

    return PackedBatches(source, layout, data_parallel_rank, seed, packing, on_rank_zero(build_plans))


def prepare_data(config: RunConfig, tokenizer: RecordTokenizer, layout: BatchLayout, data_parallel_rank: int,
                 show_progress: bool, row_multiple: int = 1, sample_multiple: int = 1) -> PreparedData:
    packing = packing_for(config, row_multiple, sample_multiple)
    cache_dir = data_cache_dir(config)
    reports: dict = {}
    train_source: Optional[SampleSource] = None
    if config.data.lazy:
        shard = StreamShard(data_parallel_rank, layout.data_parallel_size, config.training.seed,
                            config.data.shuffle_buffer_size)
        stream = SampleStream(tokenize_job(config, config.data.train_dataset_path), shard,
                              config.data.dataloader_num_workers)
        train: BatchSource = StreamedBatches(stream, layout, packing)
        reports["train"] = {"streamed": config.data.train_dataset_path}
    else:
        train_source, reports["train"] = open_source(config, config.data.train_dataset_path, tokenizer, show_progress,
                                                     cache_dir)
        if packing is not None:
            train = packed_batches(config, train_source, layout, data_parallel_rank, packing)
        else:
            train = IndexedBatches(train_source, layout, data_parallel_rank, config.training.seed)
    dev = None
    if config.training.do_eval and config.data.dev_dataset_path:
        dev, reports["dev"] = open_source(config, config.data.dev_dataset_path, tokenizer, show_progress, cache_dir)
    eos = tokenizer.tokenizer.eos_id
    return PreparedData(tokenizer, eos if eos is not None else 0, train, train_source, dev, reports, packing)
