"""``megatron-prm preprocess``: tokenize a data file once, in parallel worker processes, into a store."""

from __future__ import annotations

import itertools
import multiprocessing
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megatron_prm.data.records import iter_raw_records
from megatron_prm.data.samples import (
    DataReport, Sample, SampleBuilder, SampleOptions, check_not_empty, samples_from_raw,
)
from megatron_prm.data.store import StoreIdentity, TokenStoreWriter
from megatron_prm.tokenizer import SpecialTokenIds, Tokenizer, chat_template_digest, load_tokenizer, special_token_ids
from megatron_prm.progress import progress

# How tokenizing worker processes start (preprocess's pool, lazy streaming's DataLoader workers): spawn,
# not fork. A forked Rust (HF) tokenizer that the parent has used can deadlock, and forking a process that
# already runs threads (torch's, gloo's) may deadlock the child (Python 3.12 warns of it).
WORKER_START_METHOD = "spawn"


@dataclass(frozen=True)
class TokenizeJob:
    """Everything a worker process needs to turn raw records into samples."""

    data_path: str
    tokenizer: str
    placeholder_token: str
    reward_tokens: tuple[str, str]
    options: SampleOptions
    skip_invalid: bool
    require_labels: bool = True  # False for scoring: records need no labels


def store_identity(tokenizer: Tokenizer, special: SpecialTokenIds, job: TokenizeJob) -> StoreIdentity:
    return StoreIdentity(
        tokenizer_fingerprint=tokenizer.fingerprint(),
        vocab_size=tokenizer.vocab_size,
        placeholder_token=job.placeholder_token,
        placeholder_id=special.placeholder,
        reward_tokens=",".join(job.reward_tokens),
        reward_ids=special.reward_ids,
        max_seq_len=job.options.max_seq_len,
        max_prompt_len=job.options.max_prompt_len,
        process_reward=job.options.process_reward,
        apply_chat_template=job.options.apply_chat_template,
        system_prompt=job.options.system_prompt,
        chat_template_digest=chat_template_digest(tokenizer) if job.options.apply_chat_template else None,
        tokenization=job.options.tokenization,
    )


class RecordTokenizer:
    """A process's tokenizer and special ids for one job, loaded once."""

    def __init__(self, job: TokenizeJob):
        self.job = job
        self.tokenizer = load_tokenizer(job.tokenizer)
        self.special = special_token_ids(self.tokenizer, job.placeholder_token, list(job.reward_tokens))

    def stream(self, raw_records) -> Iterator[Sample]:
        builder = SampleBuilder(self.tokenizer, self.special, self.job.options)
        return samples_from_raw(raw_records, builder, self.job.data_path, self.job.reward_tokens,
                                skip_invalid=self.job.skip_invalid, require_labels=self.job.require_labels)

    def __call__(self, chunk: list) -> tuple[list[Sample], DataReport]:
        """Samples of a chunk of raw records, and the counts of that chunk."""
        builder = SampleBuilder(self.tokenizer, self.special, self.job.options)
        samples = list(samples_from_raw(chunk, builder, self.job.data_path, self.job.reward_tokens,
                                        skip_invalid=self.job.skip_invalid, require_labels=self.job.require_labels))
        return samples, builder.report


_worker: Optional[RecordTokenizer] = None


def _init_worker(job: TokenizeJob) -> None:
    global _worker
    # Ctrl-C reaches the whole process group: the parent stops the pool (error_boundary.stop_child_processes),
    # a worker must not print a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = RecordTokenizer(job)


def _tokenize_in_worker(chunk: list) -> tuple[list[Sample], DataReport]:
    assert _worker is not None
    return _worker(chunk)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def preprocess(job: TokenizeJob, output_prefix: str | Path, workers: int = 1, chunk_size: int = 500,
               show_progress: bool = True) -> dict:
    """Tokenize ``job.data_path`` into the store at ``output_prefix``; returns the sidecar's content.

    Workers tokenize chunks of records; the results are written in file order, so the store is the
    same whatever the number of workers.
    """
    local = RecordTokenizer(job)  # also checks the tokenizer and special tokens before any worker starts
    identity = store_identity(local.tokenizer, local.special, job)
    writer = TokenStoreWriter(output_prefix, local.tokenizer.vocab_size)
    report = DataReport()
    started = time.perf_counter()
    pool = None
    try:
        chunks = _chunks(iter(iter_raw_records(job.data_path, keep_invalid=job.skip_invalid)), chunk_size)
        if workers > 1:
            pool = multiprocessing.get_context(WORKER_START_METHOD).Pool(workers, initializer=_init_worker, initargs=(job,))
            results = pool.imap(_tokenize_in_worker, chunks)
        else:
            results = map(local, chunks)
        bar = progress(desc=f"preprocessing {Path(job.data_path).name}", unit="records", enabled=show_progress)
        for samples, part in results:
            writer.add_all(samples)
            report.merge(part)
            bar.update(part.records)
        bar.close()
        check_not_empty(report, job.data_path)
        elapsed = time.perf_counter() - started
        return writer.finish(identity, {
            "source": str(job.data_path),
            "tokenizer": job.tokenizer,
            "report": report.as_dict(),
            "workers": workers,
            "seconds": round(elapsed, 3),
            "records_per_second": round(report.records / elapsed, 1) if elapsed > 0 else None,
        })
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
