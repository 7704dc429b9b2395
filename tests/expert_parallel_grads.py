"""Losses and gradients of three training steps of a tiny MoE PRM under expert parallelism, alone or with
tensor or pipeline parallelism, or under context parallelism (tests/test_moe_training.py).

``python tests/expert_parallel_grads.py OUT EP TP PP CP AUX [REFERENCE]`` (under torchrun with EP x TP x PP x CP
processes when that is more than one): builds a tiny Qwen2-MoE (4 experts, top 2, a shared expert; four
layers, the second one dense) from a fixed seed, or with the weights of REFERENCE (the OUT of a one-process
run) cut to this rank's shards: its 4 / EP experts (whole: expert tensor parallelism 1), its
tensor-parallel shard of the rest (sequence parallelism on), its pipeline stage's layers; under context
parallelism each rank holds its chunks of every sequence (the load-balancing loss pooled over them). AUX 1 trains with
the load-balancing loss (the base's coefficient), 0 without (pipeline parallelism replaces it by
Megatron-Core's own, which one process does not compute). Trains three optimizer steps with the training's
own step (``train.train_step``: Megatron DDP, ``finalize_model_grads``), each over a global batch of four
micro batches of one shape shared out over the EP data-parallel ranks; and saves on rank 0, with
safetensors, every step's PRM loss, labelled steps, gradient norm and load-balancing loss, every
parameter's final gradient (whole, its layer and expert named by their global index) and the starting
weights. Gradient clipping is off, so the gradients the optimizer applies are those compared.
"""

import re
import sys

import numpy as np
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from context_parallel_grads import global_name, tensor_parallel_shard, tensor_parallel_whole
from megatron_prm.config import TrainingArguments
from megatron_prm.data.batching import collate, pad_to_length
from megatron_prm.data.samples import Sample
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.load_balancing import install_load_balancing
from megatron_prm.model.moe import MixtureOfExperts
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown
from megatron_prm.train import train_step
from megatron_prm.training_state import build_training_state

VOCAB, EXPERTS, LAYERS, STEPS, MICRO_BATCHES, LENGTH = 256, 4, 4, 3, 4, 40
ARCH = Architecture(
    num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.2, model_type="qwen2_moe",
    moe=MixtureOfExperts(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                         shared_expert_intermediate_size=24, router_aux_loss_coef=0.01, mlp_only_layers=(1,)))
FIGURES = ("loss", "labelled_steps", "grad_norm", "moe_load_balancing_loss")


def global_batches(step: int) -> list:
    """The step's four micro batches of two rows padded to 40 tokens (3 to 5 labelled steps each)."""
    rng = np.random.default_rng(100 + step)
    batches = []
    for micro_batch in range(MICRO_BATCHES):
        rows = []
        for row in range(2):
            length = int(rng.integers(12, LENGTH))
            positions = np.sort(rng.choice(np.arange(2, length), size=int(rng.integers(3, 6)), replace=False))
            rows.append(Sample(input_ids=rng.integers(10, VOCAB, length).astype(np.int32),
                               label_positions=positions.astype(np.int32),
                               label_values=(rng.random(len(positions)) < 0.5).astype(np.float32),
                               step_ids=np.arange(len(positions), dtype=np.int32), record_index=2 * micro_batch + row))
        batches.append(pad_to_length(collate(rows, 0), LENGTH, 0))
    return batches


def whole_name(name: str, layer_offset: int, ep_rank: int, ep: int) -> str:
    """The parameter's name in the whole model: its layer's and its expert's global index."""
    return re.sub(r"\.local_experts\.(\d+)\.", lambda m: f".local_experts.{int(m[1]) + ep_rank * EXPERTS // ep}.",
                  global_name(name, layer_offset))


def main(out: str, ep: int, tp: int, pp: int, cp: int, aux: bool, reference: str | None) -> None:
    layout = ParallelLayout(tensor_parallel_size=tp, pipeline_parallel_size=pp, context_parallel_size=cp,
                            data_parallel_size=ep, expert_parallel_size=ep, expert_tensor_parallel_size=1,
                            sequence_parallel=tp > 1)
    runtime = init_runtime("cpu", 0, layout)
    torch.manual_seed(0)
    chunks = build_model_chunks(ARCH, (7, 200), 128, ModelBuildOptions(layout=layout, use_cpu_initialization=True))
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tp_rank, tp_group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // pp)
    names = {name: whole_name(name, layer_offset, ep_rank, ep) for name, _ in chunks[0].named_parameters()}
    if reference is not None:
        weights = load_file(reference)
        with torch.no_grad():
            for name, parameter in chunks[0].named_parameters():
                full = weights[f"param.{names[name]}"]
                experts = ".local_experts." in name  # whole on every rank of its expert-parallel rank's group
                parameter.copy_(full if experts else tensor_parallel_shard(name, parameter, full, tp_rank, tp))

    def whole(name: str, parameter: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        return local if ".local_experts." in name else tensor_parallel_whole(name, parameter, local, tp_group)

    mine = {f"param.{names[name]}": whole(name, p, p.detach().clone()) for name, p in chunks[0].named_parameters()}
    install_load_balancing(chunks, ARCH.moe, None if aux else 0.0, layout)
    state = build_training_state(chunks, TrainingArguments(bf16=False, max_steps=STEPS, max_grad_norm=0.0,
                                                           warmup_steps=0, learning_rate=1e-3), STEPS)
    share = MICRO_BATCHES // runtime.data_parallel_size
    for step in range(STEPS):
        batches = global_batches(step)[runtime.data_parallel_rank * share:(runtime.data_parallel_rank + 1) * share]
        figures = train_step(state, batches, runtime, 0.5)
        mine.update({f"{key}.{step}": torch.tensor(float(figures[key]), dtype=torch.float64)
                     for key in FIGURES if key in figures})  # the losses on the last pipeline stage
        for name, parameter in state.model[0].module.named_parameters():
            mine[f"grad.{step}.{names[name]}"] = whole(name, parameter, parameter.main_grad.detach().clone())
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    if torch.distributed.get_rank() == 0:
        result = {}
        for tensors in parts:
            result.update(tensors)  # replicas (tensor-, context- and data-parallel ranks) hold the same tensors
        save_file({key: value.contiguous() for key, value in result.items()}, out)
    shutdown()


if __name__ == "__main__":
    out, ep, tp, pp, cp, aux, *reference = sys.argv[1:]
    main(out, int(ep), int(tp), int(pp), int(cp), aux == "1", reference[0] if reference else None)
