"""Reward logits and gradients of fixed micro batches under context parallelism (tests/test_context_parallel.py).

``python tests/context_parallel_grads.py OUT FAMILY FORMAT CP [TP PP REFERENCE]`` (under torchrun when more
than one process): builds a tiny model of FAMILY (llama3: Llama-3 RoPE scaling; qwen2: YaRN, Q/K/V bias)
from a fixed seed, or with the weights of REFERENCE (the OUT of a one-process run) cut to this rank's
tensor- and pipeline-parallel shards; runs Megatron-Core's forward/backward schedule over two micro batches
(FORMAT padded or packed), each cut to this rank's context-parallel share; and saves on rank 0, to OUT with
safetensors, the reward logits of every labelled step (in record and step order), every parameter's full
weight and its gradient: summed over the context-parallel ranks (and over the tensor-parallel ones where
sequence parallelism leaves partial sums), tensor-parallel shards put back together, layers named by their
place in the whole model. The samples are 16-token-multiple rows with placeholders at the chunk
boundaries of CP 2 and 4 and samples shorter than 2 x CP.
"""

import re
import sys

import numpy as np
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from megatron_prm.data.batching import collate, collate_packed, pad_to_length
from megatron_prm.data.packing import PackingOptions
from megatron_prm.data.samples import Sample
from megatron_prm.forward_step import _next_local_batch, _run_model, run_schedule
from megatron_prm.layout import ParallelLayout
from megatron_prm.loss import step_losses
from megatron_prm.model.architecture import Architecture, Llama3RopeScaling, YarnRopeScaling
from megatron_prm.model.provider import ModelBuildOptions, build_model_chunks
from megatron_prm.runtime import init_runtime, shutdown

VOCAB, SEQ, LAYERS = 256, 64, 2
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
    """Two micro batches of one length (pipeline stages exchange one shape). Padded rows are cut as one
    64-token sequence (chunks of 8 tokens at CP 4, 16 at CP 2); labels sit on the chunks' first and last
    tokens. Packed rows hold samples of 3 to 37 tokens, each padded to a multiple of 8 (2 x CP 4)."""
    rng = np.random.default_rng(7)
    if not packed:
        return [collate([sample(64, [7, 8, 15, 16, 31, 32, 47, 63], 0, rng), sample(50, [0, 23, 24, 49], 1, rng)], 0),
                collate([sample(40, [3, 39], 2, rng), sample(64, [55, 56, 63], 3, rng)], 0)]
    options = PackingOptions(SEQ * 2, sample_multiple=8)
    rows = [collate_packed([sample(37, [7, 8, 16, 36], 0, rng), sample(3, [2], 1, rng), sample(24, [0, 11, 23], 2, rng)],
                           0, options),
            collate_packed([sample(5, [4], 3, rng), sample(64, [15, 16, 40, 63], 4, rng)], 0, options)]
    return [pad_to_length(row, SEQ * 2, 0) for row in rows]


def global_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.i`` of a pipeline stage as the layer's index in the whole model."""
    return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + layer_offset}.", name)


def _gated(name: str) -> bool:
    return "linear_fc1" in name  # SwiGLU: each tensor-parallel shard holds [its gate rows; its up rows]


def tensor_parallel_shard(name: str, parameter: torch.nn.Parameter, full: torch.Tensor, rank: int, size: int):
    """This tensor-parallel rank's part of the whole tensor ``full``."""
    if size == 1 or not getattr(parameter, "tensor_model_parallel", False):
        return full
    dim = parameter.partition_dim
    if _gated(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def tensor_parallel_whole(name: str, parameter: torch.nn.Parameter, local: torch.Tensor, group) -> torch.Tensor:
    """The whole tensor from every tensor-parallel rank's ``local`` part (the inverse of the shard)."""
    size = torch.distributed.get_world_size(group)
    if size == 1 or not getattr(parameter, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    dim = parameter.partition_dim
    if _gated(name):
        halves = [part.chunk(2, dim=dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def main(out: str, family: str, packed: bool, cp: int, tp: int, pp: int, reference: str | None) -> None:
    layout = ParallelLayout(context_parallel_size=cp, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                            sequence_parallel=tp > 1)
    init_runtime("cpu", 0, layout)
    arch = Architecture(num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=4 * SEQ,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02, **FAMILIES[family])
    model = build_model_chunks(arch, (7, 200), 4 * SEQ, ModelBuildOptions(layout=layout, use_cpu_initialization=True))[0]
    tp_rank, tp_group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // pp)
    if reference is not None:
        weights = load_file(reference)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                full = weights[f"param.{global_name(name, layer_offset)}"]
                parameter.copy_(tensor_parallel_shard(name, parameter, full, tp_rank, tp))

    logits, keys = [], []

    def forward_step(data_iterator, chunk):
        batch = _next_local_batch(data_iterator, torch.device("cpu"))
        output = _run_model(chunk, batch)

        def loss(output_logits):
            logits.append(output_logits.detach())
            keys.append(torch.stack([batch.record_ids, batch.step_ids], dim=1))
            return step_losses(output_logits, batch.label_values).sum(), torch.tensor(len(batch.label_values)), {}

        return output, loss

    run_schedule([model], forward_step, micro_batches(packed), forward_only=False)
    mine = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad.detach().clone()
        torch.distributed.all_reduce(grad, group=cp_group)
        if getattr(parameter, "sequence_parallel", False):
            torch.distributed.all_reduce(grad, group=tp_group)  # each rank saw only its part of the sequence
        whole = global_name(name, layer_offset)
        mine[f"grad.{whole}"] = tensor_parallel_whole(name, parameter, grad, tp_group)
        mine[f"param.{whole}"] = tensor_parallel_whole(name, parameter, parameter.detach(), tp_group)
    report = (mine, (torch.cat(logits), torch.cat(keys)) if logits and tp_rank == 0 else None)
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, report)
    if torch.distributed.get_rank() == 0:
        result = {}
        for tensors, _ in parts:
            result.update(tensors)  # replicas (tensor- or context-parallel ranks) hold the same tensors
        outputs = [output for _, output in parts if output is not None]
        all_logits, all_keys = (torch.cat([o[i] for o in outputs]) for i in (0, 1))
        order = np.lexsort((all_keys[:, 1].numpy(), all_keys[:, 0].numpy()))
        result.update({"logits": all_logits[order].contiguous(), "keys": all_keys[order].contiguous()})
        save_file(result, out)
    shutdown()


if __name__ == "__main__":
    out, family, fmt, cp, *rest = sys.argv[1:]
    tp, pp, reference = (int(rest[0]), int(rest[1]), rest[2]) if rest else (1, 1, None)
    main(out, family, fmt == "packed", int(cp), tp, pp, reference)
