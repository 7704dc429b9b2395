"""Preprocessing throughput and the trainer's dataset memory.

1. Writes a Math-Shepherd-shaped file of ``--records`` records (question, ``Step k: ... ки`` steps and
   the ``+``/``-`` label text) and converts it with ``convert-data --from math-shepherd``.
2. Preprocesses it with the Mistral tokenizer with 1 and with ``--workers`` processes: records/s.
3. Builds a store ten times larger (the first store repeated) and measures, in fresh processes, the
   peak resident memory that opening each store and reading ``--steps`` training steps of batches adds.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prm.cli import ArgumentParser  # noqa: E402
from megatron_prm.config import build_config  # noqa: E402
from megatron_prm.data.convert import convert_file  # noqa: E402
from megatron_prm.data.pipeline import tokenize_job  # noqa: E402
from megatron_prm.data.preprocess import preprocess  # noqa: E402
from megatron_prm.data.store import META_SUFFIX  # noqa: E402

TOKENIZER = "mistral-common:tokenizer.model.v1"
WORDS = ("the", "total", "number", "of", "apples", "is", "so", "we", "need", "to", "find", "each", "box", "has",
         "then", "she", "sells", "price", "per", "hour", "works", "days", "more", "than", "twice", "half")


def shepherd_record(rng: random.Random) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 70))) + "?"
    steps = []
    for k in range(1, rng.randint(3, 9)):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
        steps.append((f"Step {k}: {text} {a} * {b} = {a * b}", rng.choice("++-")))
    body = " ".join(f"{s} ки" for s, _ in steps)
    labelled = " ".join(f"{s} {m}" for s, m in steps)
    return {"input": f"{question} {body}", "label": f"{question} {labelled}", "task": "GSM8K"}


def repeat_store(prefix: Path, target: Path, times: int) -> None:
    """A store holding ``times`` copies of the samples of ``prefix``."""
    meta = json.loads(Path(f"{prefix}{META_SUFFIX}").read_text())
    for suffix in (".tokens.bin", ".labels.bin"):
        with open(f"{target}{suffix}", "wb") as out:
            for _ in range(times):
                with open(f"{prefix}{suffix}", "rb") as part:
                    shutil.copyfileobj(part, out)
    offsets = np.load(f"{prefix}.offsets.npy")
    records = np.load(f"{prefix}.records.npy")
    total = offsets[-1]
    np.save(f"{target}.offsets.npy", np.concatenate([offsets[:-1] + i * total for i in range(times)] + [offsets[-1:] * times]))
    np.save(f"{target}.records.npy", np.concatenate([records + i * len(records) for i in range(times)]))
    meta.update(samples=meta["samples"] * times, tokens=meta["tokens"] * times,
                labelled_positions=meta["labelled_positions"] * times)
    Path(f"{target}{META_SUFFIX}").write_text(json.dumps(meta))


MEASURE = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
from megatron_prm.config import build_config
from megatron_prm.data.batching import BatchLayout, collate
from megatron_prm.data.loader import IndexedBatches
from megatron_prm.data.pipeline import open_source, tokenize_job
from megatron_prm.data.preprocess import RecordTokenizer
config = build_config({config!r})
tokenizer = RecordTokenizer(tokenize_job(config, {store!r}))
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
before = rss_kib()
source, _ = open_source(config, {store!r}, tokenizer, show_progress=False)
batches = IndexedBatches(source, BatchLayout(8, 4, 1), 0, seed=1)
peak = rss_kib()
for step in range({steps}):
    for samples in batches.next_microbatches():
        collate(samples, pad_id=2)
    peak = max(peak, rss_kib())
print(json.dumps({{"samples": len(source), "rss_growth_bytes": (peak - before) * 1024}}))
"""


def measure_dataset(store: Path, config_values: dict, steps: int) -> dict:
    code = MEASURE.format(repo=str(Path(__file__).resolve().parents[1]), config=config_values, store=str(store),
                          steps=steps)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="synthetic records to tokenize")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: the cores)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of batches read per store")
    parser.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prm-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    raw = work / "math_shepherd.jsonl"
    with open(raw, "w") as handle:
        for _ in range(args.records):
            handle.write(json.dumps(shepherd_record(rng)) + "\n")
    started = time.perf_counter()
    converted = work / "converted.jsonl"
    conversion = convert_file("math-shepherd", raw, converted, show_progress=False)
    convert_seconds = time.perf_counter() - started
    print(f"converted {conversion.converted} records in {convert_seconds:.1f} s "
          f"({conversion.converted / convert_seconds:.0f} records/s)")

    config_values = {"tokenizer_name_or_path": TOKENIZER, "max_seq_len": 4096, "max_prompt_len": 2048}
    job = tokenize_job(build_config(config_values), str(converted))
    rates = {}
    for workers in sorted({1, args.workers}):
        meta = preprocess(job, work / f"store_w{workers}", workers=workers, show_progress=False)
        rates[workers] = meta["records_per_second"]
        print(f"preprocess with {workers} worker(s): {rates[workers]:.0f} records/s "
              f"({meta['samples']} samples, {meta['tokens']} tokens)")

    store = work / f"store_w{args.workers}"
    big = work / "store_x10"
    repeat_store(store, big, 10)
    sizes = {name: sum(os.path.getsize(f"{prefix}{s}") for s in (".tokens.bin", ".labels.bin", ".offsets.npy"))
             for name, prefix in (("1x", store), ("10x", big))}
    memory = {name: measure_dataset(prefix, config_values, args.steps) for name, prefix in (("1x", store), ("10x", big))}
    for name in ("1x", "10x"):
        print(f"store {name}: {memory[name]['samples']} samples, {sizes[name] / 2**20:.1f} MiB on disk; "
              f"dataset adds {memory[name]['rss_growth_bytes'] / 2**20:.1f} MiB resident over {args.steps} steps")
    print(json.dumps({
        "records": args.records,
        "convert_records_per_s": round(conversion.converted / convert_seconds, 1),
        "preprocess_records_per_s_1_worker": rates[1],
        f"preprocess_records_per_s_{args.workers}_workers": rates[args.workers],
        "store_bytes_1x": sizes["1x"],
        "store_bytes_10x": sizes["10x"],
        "dataset_rss_growth_bytes_1x": memory["1x"]["rss_growth_bytes"],
        "dataset_rss_growth_bytes_10x": memory["10x"]["rss_growth_bytes"],
    }))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
