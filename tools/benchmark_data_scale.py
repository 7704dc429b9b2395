"""What data preparation costs once per job, and what it costs each rank, at 10k / 100k / 1M samples.

    python tools/benchmark_data_scale.py --samples 10000,100000,1000000 --world-sizes 1,8,64

For each size a store of synthetic samples is written (token ids drawn directly, long-tailed lengths up
to ``--max-seq-len``: tokenizing 1M records on a small machine takes most of an hour, and the per-rank
path reads only lengths and offsets, not what the tokens say), then

- ``plan build``: the one-time greedy_zero_padding plans of ``--epochs`` epochs (rank 0's work);
- ``rank start``: per simulated rank (the first and last rank id of each world size, in a fresh
  process each): open the store, open the cached plans, count the steps of every epoch and take the
  first batch; the seconds after imports, and the peak resident memory (VmHWM, reset after imports)
  above the resident memory after imports.

The tokenization rate of the one-time store build is measured on ``--tokenize-records`` real records
(``tokenize_once``, one process). Lazy streaming: the bytes that one reader's epoch reads from a JSONL
file (``rchar`` of /proc/self/io, buffering included) for 1, 8 and 64 readers. The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prm.cli import ArgumentParser  # noqa: E402
from megatron_prm.data.batching import BatchLayout  # noqa: E402
from megatron_prm.data.loader import PackedBatches, Packing  # noqa: E402
from megatron_prm.data.packing import PackingOptions  # noqa: E402
from megatron_prm.data.packing_plan import PlanCache  # noqa: E402
from megatron_prm.data.store import LABEL_DTYPE, StoreIdentity, TokenStore, TokenStoreWriter  # noqa: E402


def write_synthetic_store(prefix: Path, samples: int, max_seq_len: int, seed: int = 0) -> None:
    """Random token ids with long-tailed lengths (median 200, clipped to 16..max_seq_len), one labelled
    step per 64 tokens, written in chunks of 100k samples."""
    rng = np.random.default_rng(seed)
    writer = TokenStoreWriter(prefix, vocab_size=32000)
    for start in range(0, samples, 100_000):
        count = min(100_000, samples - start)
        lengths = np.clip(rng.lognormal(5.3, 0.8, count).astype(np.int64), 16, max_seq_len)
        steps = np.maximum(1, lengths // 64)
        labels = np.zeros(int(steps.sum()), dtype=LABEL_DTYPE)
        first = np.repeat(np.cumsum(steps) - steps, steps)
        labels["step"] = np.arange(len(labels)) - first
        labels["position"] = np.minimum(8 + 64 * labels["step"], np.repeat(lengths, steps) - 1)
        labels["value"] = 1.0
        writer.add_arrays(rng.integers(0, 32000, int(lengths.sum()), dtype=np.int32), labels, lengths, steps,
                          np.arange(start, start + count))
    identity = StoreIdentity("synthetic", 32000, "ки", 12902, "+,-", (648, 387), max_seq_len, max_seq_len // 2, True)
    writer.finish(identity, {"source": "synthetic", "report": {"records": samples}})


def batches(prefix: Path, rank: int, world: int, args: argparse.Namespace, cache: Path) -> PackedBatches:
    store = TokenStore(prefix)
    packing = Packing("greedy_zero_padding", PackingOptions(args.max_seq_len), 1000)
    return PackedBatches(store, BatchLayout(1, args.microbatches, world), rank, 42, packing,
                         PlanCache.beside(prefix, cache))


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(field + ":")).split()[1])


def rank_start(prefix: Path, rank: int, world: int, args: argparse.Namespace, cache: Path) -> dict:
    """One rank's start-up (run in a fresh process): seconds after imports, peak memory above them."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak resident size (VmHWM) to the current one
    baseline = _memory_kib("VmRSS")
    started = time.perf_counter()
    source = batches(prefix, rank, world, args, cache)
    steps = source.steps_for_epochs(args.epochs)
    first = source.next_microbatches()
    seconds = time.perf_counter() - started
    peak = _memory_kib("VmHWM")
    return {"seconds": seconds, "peak_mib_above_imports": (peak - baseline) / 1024, "steps": steps,
            "first_batch_samples": sum(len(row) for row in first)}


def lazy_reader_bytes(samples: int, readers: int, workdir: Path) -> dict:
    from megatron_prm.data.streaming import ReaderPosition, ReaderShare, _read_block

    path = workdir / f"lazy-{samples}.jsonl"
    if not path.exists():
        from megatron_prm.data.synthetic import write_dataset

        write_dataset(path, samples, seed=1)
    figures = {}
    for reader in sorted({0, readers - 1}):
        with open("/proc/self/io") as io:
            before = int(next(line for line in io if line.startswith("rchar")).split()[1])
        share = ReaderShare.of(path, reader, readers)
        records = 0
        with open(path, "rb") as handle:
            position = ReaderPosition(offset=share.first_line(handle))
            while True:
                raw, _, record, line = _read_block(handle, str(path), position, share, 1000)
                if not raw:
                    break
                records += len(raw)
                position = ReaderPosition(0, handle.tell(), record, line, 0)
        with open("/proc/self/io") as io:
            after = int(next(line for line in io if line.startswith("rchar")).split()[1])
        figures[reader] = {"bytes_read": after - before, "records": records}
    return {"file_bytes": path.stat().st_size, "readers": readers, "per_reader": figures}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="10000,100000,1000000", help="comma-separated store sizes")
    parser.add_argument("--world-sizes", default="1,8,64", help="comma-separated data-parallel sizes to simulate")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--microbatches", type=int, default=8, help="packed rows per rank and step")
    parser.add_argument("--epochs", type=int, default=3, help="epochs to plan")
    parser.add_argument("--tokenize-records", type=int, default=2000, help="records for the tokenization rate")
    parser.add_argument("--lazy-records", type=int, default=20000, help="records of the lazy-streaming file")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--rank-start", metavar="RANK,WORLD,PREFIX", default=None,
                        help="internal: run one simulated rank's start-up from the store at PREFIX")
    return parser


def _tokenize_rate(records: int, workdir: Path) -> dict:
    from megatron_prm.config import build_config
    from megatron_prm.data.pipeline import tokenize_job
    from megatron_prm.data.preprocess import RecordTokenizer
    from megatron_prm.data.store_cache import tokenize_once
    from megatron_prm.data.synthetic import write_dataset

    path = write_dataset(workdir / f"tokenize-{records}.jsonl", records, seed=2)
    config = build_config({"tokenizer_name_or_path": "mistral-common:tokenizer.model.v1",
                           "train_dataset_path": str(path), "max_seq_len": 1024, "max_prompt_len": 512})
    tokenizer = RecordTokenizer(tokenize_job(config, str(path)))
    started = time.perf_counter()
    tokenize_once(tokenize_job(config, str(path)), tokenizer, workdir / "cache", show_progress=False)
    first = time.perf_counter() - started
    started = time.perf_counter()
    tokenize_once(tokenize_job(config, str(path)), tokenizer, workdir / "cache", show_progress=False)
    return {"records": records, "records_per_second": records / first, "restart_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.rank_start:
        rank, world, prefix = args.rank_start.split(",", 2)
        print(json.dumps(rank_start(Path(prefix), int(rank), int(world), args, Path(prefix).parent / "cache")))
        return
    sizes = [int(n) for n in args.samples.split(",")]
    worlds = [int(n) for n in args.world_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="megatron-prm-data-scale-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results: dict = {"tokenize": _tokenize_rate(args.tokenize_records, workdir), "stores": {}}
        print(f"tokenize once: {results['tokenize']['records_per_second']:,.0f} records/s in one process; "
              f"a restart finds the store in {results['tokenize']['restart_seconds']:.3f} s", flush=True)
        print(f"{'samples':>9} {'store write':>12} {'plan build':>11} {'world':>6} {'rank':>5} "
              f"{'rank start s':>13} {'peak MiB':>9}", flush=True)
        for size in sizes:
            prefix = workdir / f"store-{size}"
            started = time.perf_counter()
            write_synthetic_store(prefix, size, args.max_seq_len)
            store_seconds = time.perf_counter() - started
            started = time.perf_counter()
            batches(prefix, 0, 1, args, workdir / "cache").steps_for_epochs(args.epochs)
            plan_seconds = time.perf_counter() - started
            figures: dict = {"store_write_seconds": store_seconds, "plan_build_seconds": plan_seconds, "ranks": {}}
            for world in worlds:
                for rank in sorted({0, world - 1}):
                    command = [sys.executable, __file__, "--rank-start", f"{rank},{world},{prefix}",
                               "--max-seq-len", str(args.max_seq_len), "--microbatches", str(args.microbatches),
                               "--epochs", str(args.epochs)]
                    out = subprocess.run(command, check=True, capture_output=True, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
                    start = json.loads(out.strip().splitlines()[-1])
                    figures["ranks"][f"{world}/{rank}"] = start
                    print(f"{size:>9,} {store_seconds:>11.1f}s {plan_seconds:>10.2f}s {world:>6} {rank:>5} "
                          f"{start['seconds']:>13.3f} {start['peak_mib_above_imports']:>9.1f}", flush=True)
            results["stores"][size] = figures
            for suffix in (".tokens.bin", ".labels.bin"):
                Path(f"{prefix}{suffix}").unlink()  # the large parts; the next size writes its own
            Path(f"{prefix}.meta.json").unlink()
        results["lazy"] = {}
        for readers in worlds:
            lazy = lazy_reader_bytes(args.lazy_records, readers, workdir)
            results["lazy"][readers] = lazy
            per = "; ".join(f"reader {r}: {f['bytes_read']:,} bytes, {f['records']} records"
                            for r, f in lazy["per_reader"].items())
            print(f"lazy, {readers} readers of a {lazy['file_bytes']:,}-byte file: {per}", flush=True)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
