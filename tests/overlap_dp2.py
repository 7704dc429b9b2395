"""Data-parallel training with and without communication overlap; tests/test_overlap.py runs it.

``torchrun --nproc-per-node 2 tests/overlap_dp2.py OUT`` (CPU, gloo): the same tiny model trains two
steps on the same per-rank microbatches four ways: plain DDP, DDP with ``overlap_grad_reduce``, the
distributed optimizer, and the distributed optimizer with ``overlap_grad_reduce`` and
``overlap_param_gather``. Each rank writes the per-step losses and grad norms, the parameters after the
last step (flattened), and for the last way whether the ranks' parameters differed before
:func:`parameters_gathered` (they must: the gather is left to the next forward pass) and after it.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from megatron_prm.config import TrainingArguments
from megatron_prm.data.batching import collate
from megatron_prm.data.samples import Sample
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown
from megatron_prm.train import train_step
from megatron_prm.training_state import CommunicationOverlap, build_training_state, parameters_gathered

ARCH = Architecture(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.02,
)
WAYS = {
    "ddp": (False, CommunicationOverlap()),
    "ddp_overlap": (False, CommunicationOverlap(grad_reduce=True)),
    "distributed_optimizer": (True, CommunicationOverlap()),
    "distributed_optimizer_overlap": (True, CommunicationOverlap(grad_reduce=True, param_gather=True)),
}
STEPS = 2


def microbatches(rank: int, step: int) -> list:
    rng = np.random.default_rng([rank, step])
    batches = []
    for _ in range(2):  # two microbatches per step: the reduction waits for the last one
        ids = rng.integers(10, 250, size=24).astype(np.int32)
        positions = np.array([5, 11, 23], dtype=np.int32)
        ids[positions] = 3
        sample = Sample(ids, positions, rng.random(3).astype(np.float32), np.arange(3, dtype=np.int32), 0)
        batches.append(collate([sample], pad_id=0))
    return batches


def flat_parameters(state) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in state.model[0].module.parameters()])


def ranks_differ(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return not torch.equal(gathered[0], gathered[1])


def main(out: str) -> None:
    runtime = init_runtime("cpu", 0, ParallelLayout(data_parallel_size=2))
    args = TrainingArguments(bf16=False, learning_rate=1e-2, max_steps=STEPS, max_grad_norm=1.0)
    report = {}
    for name, (distributed_optimizer, overlap) in WAYS.items():
        torch.manual_seed(0)
        chunks = build_model_chunks(ARCH, (7, 200), 64, ModelBuildOptions(use_cpu_initialization=True))
        state = build_training_state(chunks, args, STEPS, distributed_optimizer, overlap)
        initial = flat_parameters(state)
        steps = [train_step(state, microbatches(runtime.data_parallel_rank, step), runtime, 0.5)
                 for step in range(STEPS)]
        entry = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps]}
        if overlap.param_gather:
            entry["ranks_differ_before_gather"] = ranks_differ(flat_parameters(state))
        with parameters_gathered(state.model):
            entry["parameters"] = flat_parameters(state).tolist()
            entry["largest_update"] = (flat_parameters(state) - initial).abs().max().item()
            entry["ranks_differ_after_gather"] = ranks_differ(flat_parameters(state))
        report[name] = entry
    with open(f"{out}.rank{runtime.rank}.json", "w") as handle:
        json.dump(report, handle)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
