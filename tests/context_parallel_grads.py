"""Reward logits and gradients of fixed micro batches under context parallelism (tests/test_context_parallel.py).

``python tests/context_parallel_grads.py OUT CP FAMILY FORMAT`` (under torchrun for CP > 1): builds a tiny
model of FAMILY (llama3: Llama-3 RoPE scaling; qwen2: YaRN, Q/K/V bias) from a fixed seed, cuts every
micro batch (FORMAT padded or packed) into this rank's share, runs forward and backward, and saves on rank 0
the reward logits of every labelled step (in record and step order) and every parameter's gradient summed
over the context-parallel ranks, to OUT with safetensors. The samples are 16-token-multiple rows with
placeholders at the chunk boundaries of CP 2 and 4 and samples shorter than 2 x CP.
"""

import sys

import numpy as np
import torch
from megatron.core import parallel_state
from safetensors.torch import save_file

from megatron_prm.data.batching import collate, collate_packed
from megatron_prm.data.context_split import split_for_context_parallel
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.samples import Sample
from megatron_prm.layout import ParallelLayout
from megatron_prm.loss import step_losses
from megatron_prm.model.architecture import Architecture, Llama3RopeScaling, YarnRopeScaling
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown

VOCAB, SEQ = 256, 64
FAMILIES = {
    "llama3": {"model_type": "llama", "rope_theta": 500000.0,
               "rope_scaling": Llama3RopeScaling(factor=8.0, original_max_position_embeddings=16)},
    "qwen2": {"model_type": "qwen2", "rope_theta": 10000.0,
              "rope_scaling": YarnRopeScaling(factor=4.0, original_max_position_embeddings=16)},
}


def sample(length: int, label_positions: list[int], record: int, rng: np.random.Generator) -> Sample:
    return Sample(input_ids=rng.integers(0, VOCAB, length).astype(np.int32),
                  label_positions=np.asarray(label_positions, dtype=np.int32),
                  label_values=rng.random(len(label_positions)).astype(np.float32),
                  step_ids=np.arange(len(label_positions), dtype=np.int32), record_index=record)


def micro_batches(packed: bool) -> list:
    """Two micro batches. Padded rows are cut as one 64-token sequence (chunks of 8 tokens at CP 4, 16 at
    CP 2); labels sit on the chunks' first and last tokens. Packed rows hold samples of 3 to 37 tokens, each
    padded to a multiple of 8 (2 x CP 4)."""
    rng = np.random.default_rng(7)
    if not packed:
        return [collate([sample(64, [7, 8, 15, 16, 31, 32, 47, 63], 0, rng), sample(50, [0, 23, 24, 49], 1, rng)], 0),
                collate([sample(40, [3, 39], 2, rng), sample(64, [55, 56, 63], 3, rng)], 0)]
    options = PackingOptions(SEQ * 2, sample_multiple=8)
    return [collate_packed([sample(37, [7, 8, 16, 36], 0, rng), sample(3, [2], 1, rng), sample(24, [0, 11, 23], 2, rng)],
                           0, options),
            collate_packed([sample(5, [4], 3, rng), sample(64, [15, 16, 40, 63], 4, rng)], 0, options)]


def main(out: str, cp: int, family: str, packed: bool) -> None:
    layout = ParallelLayout(context_parallel_size=cp)
    init_runtime("cpu", 0, layout)
    arch = Architecture(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=4 * SEQ,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02, **FAMILIES[family])
    model = build_model_chunks(arch, (7, 200), 4 * SEQ, ModelBuildOptions(layout=layout, use_cpu_initialization=True))[0]
    rank, group = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_group()
    logits, keys = [], []
    for batch in micro_batches(packed):
        local = split_for_context_parallel(batch, rank, cp)
        output = model(local.tokens, local.position_ids, reward_index=local.reward_index,
                       packed_seq_params=local.packed_seq_params())
        step_losses(output, local.label_values).sum().backward()
        logits.append(output.detach())
        keys.append(torch.stack([local.record_ids, local.step_ids], dim=1))
    parts = [None] * cp
    torch.distributed.all_gather_object(parts, (torch.cat(logits), torch.cat(keys)), group=group)
    all_logits, all_keys = (torch.cat([p[i] for p in parts]) for i in (0, 1))
    order = np.lexsort((all_keys[:, 1].numpy(), all_keys[:, 0].numpy()))
    result = {"logits": all_logits[order].contiguous(), "keys": all_keys[order].contiguous()}
    for name, parameter in model.named_parameters():
        grad = parameter.grad.detach().clone()
        torch.distributed.all_reduce(grad, group=group)
        result[f"grad.{name}"] = grad
    if torch.distributed.get_rank() == 0:
        save_file(result, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "packed")
