"""Share of real tokens under four ways of batching a data set, and the time packing takes.

    python tools/benchmark_packing.py --data pb.jsonl --tokenizer mistral-common:tokenizer.model.v1 \\
        --max-seq-len 4096

- pad-to-max: every sample padded to ``max_seq_len``;
- pad-to-longest: batches of ``--batch-size`` samples in file order, padded to their longest;
- zero_padding: packed in file order (next fit) into rows;
- greedy_zero_padding: best-fit decreasing over buffers of ``--buffer-size`` samples.

For the packed modes, ``share`` counts every row as ``max_seq_len`` tokens (fixed-shape rows, as
pipeline parallelism needs); ``share_variable_rows`` counts each row at its own length (THD rows
without pipeline parallelism), and ``share_full_rows`` leaves out the last, partly filled row, which
bounds what any packing can reach on a small set. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prm.cli import ArgumentParser  # noqa: E402
from megatron_prm.config import build_config  # noqa: E402
from megatron_prm.data.packing import PackingOptions, pack  # noqa: E402
from megatron_prm.data.pipeline import open_source, tokenize_job  # noqa: E402
from megatron_prm.data.preprocess import RecordTokenizer  # noqa: E402


def packed_shares(lengths: np.ndarray, mode: str, max_seq_len: int, buffer_size: int) -> dict:
    started = time.perf_counter()
    rows = list(pack(enumerate(lengths.tolist()), mode, PackingOptions(max_seq_len), buffer_size))
    seconds = time.perf_counter() - started
    row_tokens = np.array([sum(int(lengths[i]) for i in row) for row in rows])
    real = int(lengths.sum())
    full = row_tokens[:-1] if len(rows) > 1 else row_tokens
    return {
        "share": real / (len(rows) * max_seq_len),
        "share_full_rows": float(full.sum()) / (len(full) * max_seq_len),
        "share_variable_rows": real / int(row_tokens.sum()),
        "rows": len(rows),
        "seconds": seconds,
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="records (JSON/JSONL) or a preprocessed store")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file or mistral-common:NAME")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="default: max-seq-len // 2")
    parser.add_argument("--batch-size", type=int, default=8, help="for pad-to-longest")
    parser.add_argument("--buffer-size", type=int, default=1000, help="for greedy_zero_padding")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    config = build_config({"tokenizer_name_or_path": args.tokenizer, "max_seq_len": args.max_seq_len,
                           "max_prompt_len": args.max_prompt_len})
    tokenizer = RecordTokenizer(tokenize_job(config, args.data))
    source, _ = open_source(config, args.data, tokenizer, show_progress=False)
    lengths = np.asarray(source.lengths, dtype=np.int64)
    real = int(lengths.sum())
    print(f"{len(lengths)} samples, {real} tokens, mean {lengths.mean():.0f}, max {lengths.max()}")

    started = time.perf_counter()
    batches = [lengths[i:i + args.batch_size] for i in range(0, len(lengths), args.batch_size)]
    longest = sum(len(b) * int(b.max()) for b in batches)
    figures = {
        "pad_to_max": {"share": real / (len(lengths) * args.max_seq_len), "seconds": 0.0},
        f"pad_to_longest_{args.batch_size}": {"share": real / longest, "seconds": time.perf_counter() - started},
        "zero_padding": packed_shares(lengths, "zero_padding", args.max_seq_len, args.buffer_size),
        "greedy_zero_padding": packed_shares(lengths, "greedy_zero_padding", args.max_seq_len, args.buffer_size),
    }
    print(f"{'':24}{'share':>8}{'full rows':>11}{'THD rows':>10}{'rows':>7}{'seconds':>9}")
    for name, f in figures.items():
        print(f"{name:24}{f['share']:>8.4f}{f.get('share_full_rows', float('nan')):>11.4f}"
              f"{f.get('share_variable_rows', float('nan')):>10.4f}{f.get('rows', len(lengths)):>7}{f['seconds']:>9.4f}")
    summary = {"samples": len(lengths), "tokens": real, "max_seq_len": args.max_seq_len}
    for name, f in figures.items():
        summary[name] = round(f["share"], 4)
        for key in ("share_full_rows", "share_variable_rows"):
            if key in f:
                summary[f"{name}_{key.removeprefix('share_')}"] = round(f[key], 4)
        summary[f"{name}_seconds"] = round(f["seconds"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
