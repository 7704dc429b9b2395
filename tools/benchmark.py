#!/usr/bin/env python
"""Training throughput of the PRM, and of plain Megatron-Core LM training on the same model and data.

  python tools/benchmark.py [--mode both] [--steps 5] [--seq-len 4096] [--layers 4 --hidden 256 ...]
  python tools/benchmark.py --device cuda --bf16 --preset llama3-8b --layers 8 --micro-batches 4
  torchrun --nproc-per-node 8 tools/benchmark.py --device cuda --bf16 --tensor-parallel 8 ...

Each step runs ``--micro-batches`` packed rows of ``--seq-len`` tokens (synthetic samples of
``--sample-len`` tokens, a placeholder every ``--step-len`` tokens) through Megatron's forward/backward
schedule and the optimizer. ``prm`` mode trains the PRM head (two reward rows of the LM head at the
placeholders); ``lm`` mode trains next-token prediction with the full-vocabulary cross-entropy of
Megatron-Core's GPTModel on the same rows. Figures per GPU: tokens/s, TFLOP/s by Megatron-LM's formula
(``num_floating_point_operations`` as in megatron_prm/flops.py: causal attention counted half, per
sample of a packed row; the logits term 6 x tokens x h x vocab is counted in ``lm`` mode only, since the
PRM head skips the full-vocabulary product), MFU against ``--peak-tflops``, and peak memory.
``--head-memory`` also measures the activation memory of the PRM head against full-vocabulary logits for
one row. The last line is JSON.

Beside MFU against the nominal peak, ``mfu_vs_measured_matmul`` divides by the bf16 (fp32 on the CPU)
matrix-product rate this device reaches in a short probe (``matmul_tflops``), and ``plan_estimated_bytes``
(what ``megatron-prm plan`` estimates for this model, layout and row length) sits beside the measured
peak memory. ``--preset llama3-8b`` takes Llama-3-8B's layer shape and vocabulary (hidden 4096, FFN 14336,
32 heads, 8 query groups, vocabulary 128,256) with ``--layers`` of its 32 layers. ``--profile`` prints
the PRM step's largest costs (torch profiler, by self device time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prm.cli import ArgumentParser  # noqa: E402
from megatron_prm import megatron_compat  # noqa: E402

megatron_compat.filter_unactionable_warnings()  # before the imports below import Megatron-Core
megatron_compat.import_megatron_core()

from megatron_prm.config import build_config  # noqa: E402
from megatron_prm.data.batching import MicroBatch, collate_packed  # noqa: E402
from megatron_prm.data.packing import PackingOptions  # noqa: E402
from megatron_prm.data.samples import Sample  # noqa: E402
from megatron_prm.flops import ModelShape, training_flops  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("prm", "lm", "both"), default="both",
                        help="the PRM step, a plain LM step with full-vocabulary logits, or both")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--micro-batches", type=int, default=2, help="packed rows per step per data-parallel rank")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--sample-len", type=int, default=700, help="tokens per synthetic sample in a row")
    parser.add_argument("--step-len", type=int, default=60, help="tokens per reasoning step (one placeholder each)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--ffn", type=int, default=None, help="default: 3.5 x hidden")
    parser.add_argument("--heads", type=int, default=8, help="attention (query) heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--recompute", action="store_true", help="full activation recompute")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and compute (default fp32)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM dense bf16: 989)")
    parser.add_argument("--head-memory", action="store_true",
                        help="also measure PRM head vs full-vocabulary logits memory (--head-vocab, --head-hidden)")
    parser.add_argument("--head-vocab", type=int, default=128256, help="--head-memory: vocabulary size")
    parser.add_argument("--head-hidden", type=int, default=4096, help="--head-memory: hidden size")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="a real model's shape; --layers still counts")
    parser.add_argument("--profile", action="store_true", help="print the largest costs of one PRM step")
    return parser


def parse_args() -> argparse.Namespace:
    args = build_parser().parse_args()
    for name, value in PRESETS.get(args.preset, {}).items():
        setattr(args, name, value)
    return args


# Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B): the layer shape and vocabulary.
PRESETS = {"llama3-8b": {"hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}}


def matmul_tflops(device: torch.device, repeats: int = 10) -> float:
    """The dense matrix-product rate of this device: bf16 8192^3 on a GPU (fp32 1024^3 on the CPU), the
    mean of ``repeats`` products after three warm-ups."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def profile_step(state, forward_step, rows, device: torch.device, top: int = 15) -> str:
    """The largest costs of one training step, by self time on the device (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_prm.forward_step import run_schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run_schedule(state.model, forward_step, rows, forward_only=False)
        state.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=top)


def synthetic_rows(args, count: int, vocab: int, placeholder: int, seed: int) -> list[MicroBatch]:
    """Packed rows of random samples; each sample ends a step every ``step_len`` tokens."""
    rng = np.random.default_rng(seed)
    options = PackingOptions(args.seq_len, row_multiple=args.tensor_parallel)
    rows = []
    for _ in range(count):
        samples, used = [], 0
        while used + args.sample_len <= args.seq_len:
            ids = rng.integers(3, vocab, size=args.sample_len).astype(np.int32)
            positions = np.arange(args.step_len - 1, args.sample_len, args.step_len, dtype=np.int32)
            ids[positions] = placeholder
            samples.append(Sample(ids, positions, rng.integers(0, 2, size=positions.size).astype(np.float32),
                                  np.arange(positions.size, dtype=np.int32), len(samples)))
            used += args.sample_len
        rows.append(collate_packed(samples, 0, options))
    return rows


def step_flops(shape: ModelShape, rows: list[MicroBatch], data_parallel: int, with_logits: bool) -> float:
    """Megatron-LM's FLOPs of one optimizer step: every packed row, attention per sample, all DP ranks."""
    return data_parallel * sum(
        training_flops(shape, (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist(), with_logits=with_logits)
        for row in rows)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) * 1024


def run_mode(mode: str, args, state, rows: list[MicroBatch], runtime) -> dict:
    from megatron_prm.forward_step import make_train_forward_step, run_schedule

    def lm_forward_step(data_iterator, model):
        batch = next(data_iterator).to(runtime.device)
        labels = torch.roll(batch.tokens, shifts=-1, dims=1)
        losses = model(batch.tokens, batch.position_ids, labels=labels, packed_seq_params=batch.packed_seq_params())

        def loss_func(output):
            count = torch.tensor(output.numel(), dtype=torch.int, device=output.device)
            return output.sum(), count, {"lm": output.sum().detach()}

        return losses, loss_func

    forward_step = make_train_forward_step(runtime.device, 0.5) if mode == "prm" else lm_forward_step
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    times = []
    for step in range(args.warmup + args.steps):
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run_schedule(state.model, forward_step, rows, forward_only=False)
        state.optimizer.step()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    figures = {"step_s": float(np.median(times)), "step_s_all": [round(t, 4) for t in times],
               "peak_memory_bytes": peak_memory_bytes(runtime.device)}
    if args.profile and mode == "prm" and runtime.rank == 0:
        print(profile_step(state, forward_step, rows, runtime.device), file=sys.stderr)
    return figures


def head_memory(hidden: int, vocab: int, seq_len: int, step_len: int) -> dict:
    """Bytes of activations (outputs and tensors saved for backward, weights excluded) of the PRM head
    and of full-vocabulary logits + cross-entropy, for one row of ``seq_len`` tokens (bf16 weights and
    hidden states; cross-entropy in fp32, as Megatron computes it)."""
    import torch.nn.functional as F

    from megatron_prm.model.reward_head import select_positions

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, dtype=torch.bfloat16) * 0.02)
    hidden_states = torch.randn(seq_len, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(step_len - 1, seq_len, step_len)
    reward_index = torch.stack([torch.zeros_like(positions), positions], dim=1)
    parameters = {weight.data_ptr()}

    def measure(compute) -> int:
        saved = []

        def pack(tensor):
            if tensor.data_ptr() not in parameters and tensor.data_ptr() != hidden_states.data_ptr():
                saved.append(tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = compute()
        return sum(saved) + output.untyped_storage().nbytes()

    def prm_head():
        selected = select_positions(hidden_states, reward_index)  # [n, h]
        logits = selected @ weight[torch.tensor([648, 387])].t()  # the two reward rows
        return F.cross_entropy(logits.float(), torch.zeros(len(positions), dtype=torch.long), reduction="none")

    def full_logits():
        logits = hidden_states[:, 0] @ weight.t()  # [s, V]
        return F.cross_entropy(logits.float(), torch.randint(0, vocab, (seq_len,)), reduction="none")

    prm_bytes = measure(prm_head)
    full_bytes = measure(full_logits)
    return {"head_vocab": vocab, "head_hidden": hidden, "head_tokens": seq_len, "head_labelled_steps": len(positions),
            "prm_head_activation_bytes": prm_bytes, "full_logits_activation_bytes": full_bytes,
            "full_over_prm": round(full_bytes / prm_bytes, 1)}


def main() -> None:
    args = parse_args()
    from megatron_prm.layout import ParallelLayout
    from megatron_prm.model.architecture import resolve_architecture
    from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks, padded_vocab_size
    from megatron_prm.plan import plan
    from megatron_prm.runtime import init_runtime, shutdown
    from megatron_prm.training_state import build_training_state

    ffn = args.ffn or int(3.5 * args.hidden)
    config = build_config({
        "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": ffn,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "max_position_embeddings": args.seq_len, "max_seq_len": args.seq_len, "max_prompt_len": args.seq_len // 2,
        "tensor_parallel_degree": args.tensor_parallel, "pipeline_parallel_degree": args.pipeline_parallel,
        "sequence_parallel": args.tensor_parallel > 1, "recompute": args.recompute, "bf16": args.bf16,
        "device": args.device, "learning_rate": 1e-5, "warmup_steps": 0, "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": args.micro_batches,
        "train_dataset_path": "synthetic", "output_dir": "/tmp/megatron-prm-benchmark",
    }, "benchmark")
    arch = resolve_architecture(config.model, args.vocab, args.seq_len)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // (args.tensor_parallel * args.pipeline_parallel)
    layout = ParallelLayout(args.tensor_parallel, args.pipeline_parallel, 1, dp, args.tensor_parallel > 1)
    runtime = init_runtime(args.device, 1234, layout)
    options = ModelBuildOptions.from_config(config, layout, runtime.use_transformer_engine, runtime.is_cpu)
    placeholder, good, bad = 5, 6, 7
    rows = synthetic_rows(args, args.micro_batches, args.vocab, placeholder, seed=runtime.data_parallel_rank)
    tokens_per_step = sum(r.tokens.shape[1] for r in rows) * dp
    shape = ModelShape.from_architecture(arch, padded_vocab_size(args.vocab, args.tensor_parallel))
    measured_tflops = matmul_tflops(runtime.device)
    estimate = plan(config, arch, nodes=1, gpus_per_node=world, gpu_memory_gib=1e6)  # no fit check
    report = {"device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu",
              "transformer_engine": runtime.use_transformer_engine, "world_size": world, "bf16": args.bf16,
              "layers": args.layers, "hidden": args.hidden, "ffn": ffn, "heads": args.heads, "kv_heads": args.kv_heads,
              "vocab": args.vocab, "seq_len": args.seq_len, "tokens_per_step": tokens_per_step,
              "matmul_tflops": round(measured_tflops, 2), "peak_tflops": args.peak_tflops,
              "plan_estimated_bytes": estimate["estimated_total_bytes"]}
    print(f"matrix products on this device: {measured_tflops:.3g} TFLOP/s; plan estimates "
          f"{estimate['estimated_total_bytes'] / 2**30:.2f} GiB per GPU", file=sys.stderr)
    modes = ("prm", "lm") if args.mode == "both" else (args.mode,)
    for mode in modes:
        torch.manual_seed(1234)
        chunks = build_model_chunks(arch, (good, bad), args.seq_len, options)
        state = build_training_state(chunks, config.training, args.warmup + args.steps, layout.distributed_optimizer)
        timing = run_mode(mode, args, state, rows, runtime)
        tokens_per_s_per_gpu = tokens_per_step / timing["step_s"] / world
        tflops = step_flops(shape, rows, dp, with_logits=mode == "lm") / timing["step_s"] / world / 1e12
        report[mode] = {**timing, "tokens_per_s_per_gpu": round(tokens_per_s_per_gpu, 1),
                        "tflops_per_gpu": round(tflops, 4), "lm_head_flops_counted": mode == "lm",
                        "mfu": round(tflops / args.peak_tflops, 5),
                        "mfu_vs_measured_matmul": round(tflops / measured_tflops, 5)}
        print(f"{mode}: {timing['step_s']:.3f} s/step, {tokens_per_s_per_gpu:.0f} tokens/s/GPU, {tflops:.3f} TFLOP/s/GPU "
              f"(LM-head term {'counted' if mode == 'lm' else 'not counted'}), MFU {tflops / args.peak_tflops:.2%} "
              f"of {args.peak_tflops} TFLOP/s, {tflops / measured_tflops:.2%} of the measured matrix-product rate; "
              f"peak memory {timing['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        del state, chunks
        gc.collect()  # the model, optimizer and config refer to each other: free this mode's memory first
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    if len(modes) == 2:
        report["prm_over_lm_step_time"] = round(report["prm"]["step_s"] / report["lm"]["step_s"], 4)
        print(f"PRM / LM step time: {report['prm_over_lm_step_time']}", file=sys.stderr)
    if args.head_memory and runtime.rank == 0:
        report.update(head_memory(args.head_hidden, args.head_vocab, args.seq_len, args.step_len))
        print(f"one {args.seq_len}-token row at vocab {args.head_vocab}, hidden {args.head_hidden}: PRM head "
              f"{report['prm_head_activation_bytes'] / 2**20:.2f} MiB vs full-vocabulary logits "
              f"{report['full_logits_activation_bytes'] / 2**30:.2f} GiB ({report['full_over_prm']}x)", file=sys.stderr)
    shutdown()
    if runtime.rank == 0:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
