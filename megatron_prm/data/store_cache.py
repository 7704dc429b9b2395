"""The token store of a JSON/JSONL file, built once per data set and reused by every rank and restart.

A run given a data file (not a preprocessed store) tokenizes it once: global rank 0 runs
``preprocess`` into the run's cache directory while the other ranks wait, then every rank opens the
store like one made by ``megatron-prm preprocess``. The store's name carries the digest of what decides
its content (the file's resolved path, size and modification time, the tokenizer identity and sample
options), so a restart or requeue finds it and tokenizes nothing, and a changed file or setting gets a
store of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from megatron_prm.data.one_rank import on_rank_zero
from megatron_prm.data.preprocess import RecordTokenizer, TokenizeJob, preprocess, store_identity
from megatron_prm.data.store import store_prefix

# Below this size one process tokenizes faster than a pool can start (spawned workers load the tokenizer).
_POOL_FROM_BYTES = 16 << 20


def cached_store_prefix(job: TokenizeJob, tokenizer: RecordTokenizer, cache_dir: Path) -> Path:
    """Where the store of ``job`` lives in ``cache_dir`` (whether or not it is built yet)."""
    source = Path(job.data_path).resolve()
    stat = source.stat()
    decided_by = {
        "source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "identity": dataclasses.asdict(store_identity(tokenizer.tokenizer, tokenizer.special, job)),
        "skip_invalid": job.skip_invalid, "require_labels": job.require_labels,
    }
    digest = hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{source.name}-{digest}"


def _workers(source: Path) -> int:
    if source.stat().st_size < _POOL_FROM_BYTES:
        return 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks))


def tokenize_once(job: TokenizeJob, tokenizer: RecordTokenizer, cache_dir: Path, show_progress: bool) -> Path:
    """The prefix of the store of ``job``: built by global rank 0 if it does not exist yet, reused if it does
    (rank 0 names it for all: every rank opens the same store, however its nodes mount the data)."""

    def build() -> Path:
        prefix = cached_store_prefix(job, tokenizer, cache_dir)
        if store_prefix(prefix) is None:
            preprocess(job, prefix, workers=_workers(Path(job.data_path)), show_progress=show_progress)
        return prefix

    return on_rank_zero(build)
