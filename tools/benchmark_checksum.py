#!/usr/bin/env python
"""What the checkpoint manifest costs: CRC-32 while saving and when loading, for a ~1B-parameter model.

Writes random tensors (default 1.1e9 bf16 parameters, the TinyLlama-1.1B size: 2.05 GiB) through
``dist_checkpointing.save`` in one process, as a model-only checkpoint is written, then times the
manifest the way a save computes it (the rank's own ``.distcp`` files, then the rest) and a load's full
verification (sizes and CRC-32). The last line is JSON with seconds and GB/s. The files are read back
from the page cache where they still are; a cold read from a parallel filesystem is bounded by that
filesystem rather than by the CRC (zlib.crc32 alone: about 2 GB/s on one core here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_prm.checkpoint_manifest import rank_files, records_for, verify_checkpoint, write_manifest  # noqa: E402
from megatron_prm.cli import ArgumentParser  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=float, default=1.1e9, help="bf16 parameters to write")
    parser.add_argument("--tensor-elements", type=int, default=2048 * 5632, help="elements per tensor")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    return parser


def main() -> int:
    args = build_parser().parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_prm import cpu_mode

    cpu_mode.enable()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="checksum-bench-"))
    directory = workdir / "iter_0000001"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    count = int(args.parameters) // args.tensor_elements
    generator = torch.Generator().manual_seed(0)
    state = {f"t{i}": ShardedTensor.from_rank_offsets(
        f"t{i}", torch.randn(args.tensor_elements, generator=generator).to(torch.bfloat16)) for i in range(count)}
    start = time.perf_counter()
    dist_checkpointing.save(state, str(directory))
    save_s = time.perf_counter() - start
    del state
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())

    start = time.perf_counter()
    own = records_for(directory, rank_files(directory, 0))
    write_manifest(directory, own)
    manifest_s = time.perf_counter() - start
    start = time.perf_counter()
    problems = verify_checkpoint(directory, checksums=True)
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    verify_checkpoint(directory, checksums=False)
    sizes_s = time.perf_counter() - start
    assert not problems, problems
    if args.workdir is None:
        shutil.rmtree(workdir)
    result = {"parameters": count * args.tensor_elements, "checkpoint_bytes": size, "save_s": round(save_s, 2),
              "manifest_s": round(manifest_s, 2), "manifest_gb_per_s": round(size / manifest_s / 1e9, 2),
              "manifest_over_save": round(manifest_s / save_s, 3), "verify_s": round(verify_s, 2),
              "verify_gb_per_s": round(size / verify_s / 1e9, 2), "sizes_only_s": round(sizes_s, 4)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
