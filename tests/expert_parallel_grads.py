"""Losses and gradients of three training steps of a tiny MoE PRM under expert parallelism
(tests/test_moe_training.py).

``python tests/expert_parallel_grads.py OUT EP [REFERENCE]`` (under torchrun with EP processes when EP > 1):
builds a tiny Qwen2-MoE (4 experts, top 2, a shared expert; three layers, the middle one dense) from a fixed
seed, or with the weights of REFERENCE (the OUT of a one-process run), each rank holding its 4 / EP experts;
trains three optimizer steps with the training's own step (``train.train_step``: Megatron DDP, the
load-balancing loss, ``finalize_model_grads``), each over a global batch of four micro batches shared out
over the EP data-parallel ranks; and saves on rank 0, with safetensors, every step's PRM loss, labelled
steps, gradient norm, load-balancing loss and every parameter's final gradient (experts named by their global index), and
the starting weights. Gradient clipping is off, so the gradients the optimizer applies are those compared.
"""

import re
import sys

import numpy as np
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from megatron_prm.config import TrainingArguments
from megatron_prm.data.batching import collate
from megatron_prm.data.samples import Sample
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.load_balancing import install_load_balancing
from megatron_prm.model.moe import MixtureOfExperts
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown
from megatron_prm.train import train_step
from megatron_prm.training_state import build_training_state

VOCAB, EXPERTS, STEPS, MICRO_BATCHES = 256, 4, 3, 4
ARCH = Architecture(
    num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.2, model_type="qwen2_moe",
    moe=MixtureOfExperts(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                         shared_expert_intermediate_size=24, router_aux_loss_coef=0.01, mlp_only_layers=(1,)))


def global_batches(step: int) -> list:
    """The step's four micro batches of two padded rows (3 to 5 labelled steps each)."""
    rng = np.random.default_rng(100 + step)
    batches = []
    for micro_batch in range(MICRO_BATCHES):
        rows = []
        for row in range(2):
            length = int(rng.integers(12, 40))
            positions = np.sort(rng.choice(np.arange(2, length), size=int(rng.integers(3, 6)), replace=False))
            rows.append(Sample(input_ids=rng.integers(10, VOCAB, length).astype(np.int32),
                               label_positions=positions.astype(np.int32),
                               label_values=(rng.random(len(positions)) < 0.5).astype(np.float32),
                               step_ids=np.arange(len(positions), dtype=np.int32), record_index=2 * micro_batch + row))
        batches.append(collate(rows, 0))
    return batches


def global_expert_name(name: str, ep_rank: int) -> str:
    """``local_experts.i`` of this expert-parallel rank as the expert's index among all of them."""
    return re.sub(r"\.local_experts\.(\d+)\.", lambda m: f".local_experts.{int(m[1]) + ep_rank * EXPERTS // ep_size()}.",
                  name)


def ep_size() -> int:
    return parallel_state.get_expert_model_parallel_world_size()


def main(out: str, ep: int, reference: str | None) -> None:
    layout = ParallelLayout(data_parallel_size=ep, expert_parallel_size=ep)
    runtime = init_runtime("cpu", 0, layout)
    torch.manual_seed(0)
    chunks = build_model_chunks(ARCH, (7, 200), 128, ModelBuildOptions(layout=layout, use_cpu_initialization=True))
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    named = {global_expert_name(name, ep_rank): p for name, p in chunks[0].named_parameters()}
    if reference is not None:
        weights = load_file(reference)
        with torch.no_grad():
            for name, parameter in named.items():
                parameter.copy_(weights[f"param.{name}"])
    mine = {f"param.{name}": p.detach().clone() for name, p in named.items()}
    install_load_balancing(chunks, ARCH.moe, None, layout)
    state = build_training_state(chunks, TrainingArguments(bf16=False, max_steps=STEPS, max_grad_norm=0.0,
                                                           warmup_steps=0, learning_rate=1e-2), STEPS)
    share = MICRO_BATCHES // runtime.data_parallel_size
    for step in range(STEPS):
        batches = global_batches(step)[runtime.data_parallel_rank * share:(runtime.data_parallel_rank + 1) * share]
        figures = train_step(state, batches, runtime, 0.5)
        for key in ("loss", "labelled_steps", "grad_norm", "moe_load_balancing_loss"):
            mine[f"{key}.{step}"] = torch.tensor(float(figures[key]), dtype=torch.float64)
        for name, parameter in state.model[0].module.named_parameters():
            mine[f"grad.{step}.{global_expert_name(name, ep_rank)}"] = parameter.main_grad.detach().clone()
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    if torch.distributed.get_rank() == 0:
        result = {}
        for tensors in parts:
            result.update(tensors)  # data-parallel replicas hold the same dense gradients and step figures
        save_file(result, out)
    shutdown()


if __name__ == "__main__":
    out, ep, *rest = sys.argv[1:]
    main(out, int(ep), rest[0] if rest else None)
