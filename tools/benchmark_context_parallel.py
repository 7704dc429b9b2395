#!/usr/bin/env python
"""Activation memory per rank against sequence length under context parallelism (issue 23), on CPU.

For each sequence length (default 4k, 8k, 16k, 32k) and context-parallel size (default 1, 2, 4) it starts
that many gloo processes with torchrun; each builds a tiny wide Llama-shaped model in bf16 (2 layers,
hidden 256, FFN 688, 4 heads, 1 key/value head; no Transformer Engine, so the package's context-parallel attention), cuts one
row of that many tokens into its share and runs the forward pass, counting the bytes of every tensor
autograd saves for the backward pass (each storage once, parameters left out): the activation memory the
backward pass needs on that rank. It prints the largest rank's figure beside `plan`'s estimate for the same
shape and layout (Korthikanti et al.'s formula, bf16, no dropout masks counted by this model: see
megatron_prm/plan.py), their ratio, and the ratio to CP 1 at the same length. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_prm.cli import ArgumentParser  # noqa: E402

# Grouped-query attention with one key/value head, as a 70B model has per tensor-parallel rank (8 of 64
# heads under TP8): the keys and values that every context-parallel rank gathers are then small.
SHAPE = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 64}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="benchmark_context_parallel.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="sequence lengths, comma-separated")
    parser.add_argument("--cp", default="1,2,4", help="context-parallel sizes, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # output file of one measuring process group
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    return parser


def architecture(length: int):
    from megatron_prm.model.architecture import Architecture

    return Architecture(**SHAPE, vocab_size=1024, max_position_embeddings=length, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)


def measure(out: str, length: int) -> None:
    """One rank: the bytes autograd keeps for the backward pass of one row of ``length`` tokens."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_prm.data.batching import collate
    from megatron_prm.data.context_split import split_for_context_parallel
    from megatron_prm.data.samples import Sample
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.provider import ModelBuildOptions, Precision, build_model_chunks
    from megatron_prm.runtime import init_runtime, shutdown

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout(context_parallel_size=cp)
    init_runtime("cpu", 0, layout)
    arch = architecture(length)
    options = ModelBuildOptions(precision=Precision(bf16=True), layout=layout, use_cpu_initialization=True)
    model = build_model_chunks(arch, (7, 200), length, options)[0]
    rng = np.random.default_rng(0)
    positions = np.linspace(0, length - 1, 64).astype(np.int32)
    sample = Sample(rng.integers(0, 1024, length).astype(np.int32), positions, np.ones(64, np.float32),
                    np.arange(64, dtype=np.int32), 0)
    batch = split_for_context_parallel(collate([sample], 0, 2 * cp), parallel_state.get_context_parallel_rank(), cp)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(batch.tokens, batch.position_ids, reward_index=batch.reward_index,
                       packed_seq_params=batch.packed_seq_params())
    assert logits.requires_grad
    figures = [None] * cp
    dist.all_gather_object(figures, sum(saved.values()))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(figures))
    shutdown()


def run(lengths: list[int], sizes: list[int]) -> list[dict]:
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.plan import activation_bytes

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for length in lengths:
            for cp in sizes:
                out = Path(scratch) / f"{length}-{cp}.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp), "--master-port",
                           str(29700 + cp), str(Path(__file__).resolve()), "--worker", str(out), "--seq-len", str(length)]
                subprocess.run(command, cwd=REPO, check=True, capture_output=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // cp))})
                per_rank = json.loads(out.read_text())
                estimate = activation_bytes(architecture(length), ParallelLayout(context_parallel_size=cp), length, False)
                rows.append({"length": length, "cp": cp, "measured_bytes": max(per_rank), "per_rank": per_rank,
                             "plan_bytes": estimate})
                row = rows[-1]
                base = next(r for r in rows if r["length"] == length and r["cp"] == sizes[0])
                row["measured_over_plan"] = row["measured_bytes"] / estimate
                row["measured_over_first_cp"] = row["measured_bytes"] / base["measured_bytes"]
                print(f"{length:>7} tokens  CP {cp}:  measured {row['measured_bytes'] / 2**20:8.1f} MiB  plan "
                      f"{estimate / 2**20:8.1f} MiB  measured/plan {row['measured_over_plan']:.2f}  "
                      f"vs CP {sizes[0]} {row['measured_over_first_cp']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        measure(args.worker, args.seq_len)
        return
    rows = run([int(x) for x in args.lengths.split(",")], [int(x) for x in args.cp.split(",")])
    print(json.dumps({"shape": SHAPE, "dtype": "bf16", "rows": rows}))


if __name__ == "__main__":
    main()
