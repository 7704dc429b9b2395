#!/usr/bin/env python
"""What a checkpoint costs each rank as data parallelism grows (issue 21), measured on CPU with gloo.

For each data-parallel size (default 1, 2, 4, 8) it starts that many processes with torchrun; each builds
a Llama-shaped model of about 60M parameters with the recipes' settings (bf16, the distributed optimizer),
takes one training step, then measures, per rank:

- extra peak host memory during a save (peak RSS during the save minus RSS before it, via
  ``/proc/self/clear_refs``), in bytes per local parameter (the rank's model-parallel shard);
- bytes it wrote (its ``.distcp`` files, and ``common.pt`` on rank 0) and the save's wall time;
- bytes it read from the checkpoint files on resume (every stored item the reader reads);
- with ``async_save``, the time training was blocked by the save, against the synchronous save.

``--format unified`` measures ``unified_checkpoint: true`` instead. Targets (issue 21): extra host memory
<= 2 bytes per local parameter and flat in DP; the largest writer <= 1.5x the mean; bytes read on resume
<= 1.2x the checkpoint in total; an async save blocks <= 20% of a synchronous one. The table goes to
stdout; the last line is JSON with every rank's figures.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_prm.cli import ArgumentParser  # noqa: E402

MODEL = {"num_hidden_layers": 8, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_seq_len": 128, "max_prompt_len": 64}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-parallel-sizes", default="1,2,4,8",
                        help="comma-separated data-parallel sizes to save with")
    parser.add_argument("--format", choices=("default", "unified"), default="default",
                        help="default: dp_reshardable, fully parallel; unified: unified_checkpoint true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def _count_reads():
    """Count the bytes of every stored item that DCP's file reader reads."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    counter = {"bytes": 0}
    original = FileSystemReader._slice_file

    def counting(self, file, sinfo):
        counter["bytes"] += sinfo.length
        return original(self, file, sinfo)

    FileSystemReader._slice_file = counting
    return counter


def worker(args) -> None:
    import torch.distributed as dist

    from megatron_prm import checkpoint
    from megatron_prm.checkpoint_io import CheckpointWriter
    from megatron_prm.config import load_config
    from megatron_prm.train import save, setup, train_step

    workdir = args.workdir
    rank = int(os.environ["RANK"])
    values = {**MODEL, "tokenizer_name_or_path": "mistral-common:tokenizer.model.v1", "device": "cpu", "bf16": True,
              "sharding": "stage1", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
              "max_steps": 10, "warmup_steps": 0, "train_dataset_path": str(workdir / "train.jsonl"),
              "dev_dataset_path": None, "unified_checkpoint": args.format == "unified", "seed": 3}
    output = workdir / "run"
    config = load_config(None, [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
                         + [f"--output_dir={output}"])
    run = setup(config)
    local_parameters = sum(p.numel() for chunk in run.state.model for p in chunk.parameters())
    train_step(run.state, run.collator(run.data.train.next_microbatches()), run.runtime, 0.5)
    figures: dict = {"rank": rank, "local_parameters": local_parameters}

    # Synchronous save: memory, bytes written, time.
    dist.barrier()
    rss_before = _rss_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    save(run, 1, None)
    figures["save_s"] = time.perf_counter() - start
    figures["extra_peak_bytes"] = (_rss_kib("VmHWM") - rss_before) * 1024
    figures["extra_bytes_per_local_parameter"] = figures["extra_peak_bytes"] / local_parameters
    directory = output / "iter_0000001"
    written = sum(p.stat().st_size for p in directory.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        written += (directory / "common.pt").stat().st_size
    figures["written_bytes"] = written
    figures["checkpoint_bytes"] = sum(p.stat().st_size for p in directory.glob("*.distcp")) + (
        directory / "common.pt").stat().st_size

    # A second save (cached plan, no validation): the regular cost; then the same asynchronously.
    start = time.perf_counter()
    save(run, 2, None)
    figures["second_save_s"] = time.perf_counter() - start
    run.checkpoints = CheckpointWriter(async_save=True)
    save(run, 3, None)  # the first async save plans and validates: like the first synchronous one
    run.checkpoints.wait()
    dist.barrier()
    start = time.perf_counter()
    save(run, 4, None)
    figures["async_blocked_s"] = time.perf_counter() - start
    run.checkpoints.wait()
    figures["async_total_s"] = time.perf_counter() - start

    # Resume: bytes this rank reads from the files.
    counter = _count_reads()
    dist.barrier()
    start = time.perf_counter()
    checkpoint.load_checkpoint(run.state, directory, run.arch, run.layout, run.train_state.optimizer_format,
                               verify_checksums=False)
    figures["load_s"] = time.perf_counter() - start
    figures["read_bytes"] = counter["bytes"]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        args.output.write_text(json.dumps(gathered))


def _table(results: dict[int, list[dict]]) -> str:
    lines = ["DP | params/rank | extra save mem (B/param, max) | written MiB max / mean | read on resume / ckpt | "
             "save s (1st, 2nd) | async blocked s (/ 2nd sync) | load s"]
    for dp, ranks in results.items():
        ckpt = ranks[0]["checkpoint_bytes"]
        written = [r["written_bytes"] for r in ranks]
        mean = sum(written) / len(written)
        lines.append(
            f"{dp} | {ranks[0]['local_parameters'] / 1e6:.1f}M | "
            f"{max(r['extra_bytes_per_local_parameter'] for r in ranks):.2f} | "
            f"{max(written) / 2**20:.1f} / {mean / 2**20:.1f} ({max(written) / mean:.2f}x) | "
            f"{sum(r['read_bytes'] for r in ranks) / ckpt:.2f}x | "
            f"{max(r['save_s'] for r in ranks):.2f}, {max(r['second_save_s'] for r in ranks):.2f} | "
            f"{max(r['async_blocked_s'] for r in ranks):.2f} "
            f"({max(r['async_blocked_s'] for r in ranks) / max(r['second_save_s'] for r in ranks):.0%}) | "
            f"{max(r['load_s'] for r in ranks):.2f}")
    return "\n".join(lines)


def main() -> int:
    args = build_parser().parse_args()
    if args.worker:
        worker(args)
        return 0
    from megatron_prm.data.synthetic import write_dataset

    base = args.workdir or Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    results: dict[int, list[dict]] = {}
    for dp in [int(x) for x in args.data_parallel_sizes.split(",")]:
        workdir = base / f"dp{dp}"
        workdir.mkdir(parents=True, exist_ok=True)
        write_dataset(workdir / "train.jsonl", 64, seed=1)
        output = workdir / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(dp), "--master-addr",
                   "127.0.0.1", "--master-port", str(29600 + dp), str(Path(__file__).resolve()), "--worker",
                   "--format", args.format, "--workdir", str(workdir), "--output", str(output)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-5000:], file=sys.stderr)
            return 1
        results[dp] = json.loads(output.read_text())
        print(f"DP {dp}: done", file=sys.stderr, flush=True)
    print(f"format: {args.format}")
    print(_table(results))
    print(json.dumps({str(dp): ranks for dp, ranks in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
