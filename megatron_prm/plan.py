"""``megatron-prm plan``: the parallel layout, parameters and memory per GPU of a run, without a GPU.

Memory per GPU (bytes, the most loaded pipeline stage):
- weights: parameters x 2 (bf16/fp16) or 4 (fp32);
- gradients: trainable parameters x 4 (Megatron's DDP buffer holds fp32 gradients, under bf16/fp16 too;
  the LM head that ``reward_head: mlp`` leaves unused is frozen);
- optimizer: trainable parameters x 12 (fp32 main weights + Adam moments) under bf16/fp16, x 8 in fp32; divided by
  the data-parallel size with the distributed optimizer (``sharding: stage1``);
- activations per layer of one micro batch of ``s`` tokens (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", with fused attention so no ``s x s`` scores are
  kept): ``s h (10 + 24 f / (4 h)) / t`` bytes for a SwiGLU block under sequence parallelism (the
  paper's ``34 s h`` with the MLP term rescaled from 4h GeLU to the gated FFN ``f``), ``s h (10 + 24 f /
  (4 h) / t)`` without it (the norms' and residuals' ``10 s h`` whole on every tensor-parallel rank);
  ``2 s h / t`` (``2 s h`` without sequence parallelism) per layer with full recompute plus one layer's
  full activations; ``s`` is divided by the context-parallel size (each rank holds ``s / cp`` tokens of
  the sequence); the first pipeline stage holds ``pp`` micro batches in flight under 1F1B.
These are estimates (allocator fragmentation and communication buffers come on top; keep headroom).

Checkpoints (:func:`checkpoint_figures`): a save writes the weights (2 or 4 bytes per parameter) and the
optimizer state (fp32 main weights + Adam moments, 12 bytes per trainable parameter; 8 in fp32 without the
distributed optimizer) of every
model-parallel shard once; with the fully parallel save each of the shard's data-parallel ranks writes
1/DP of it, without gathering anything. A MoE base's routed experts are shards of their own: each of the
EP x ETP expert ranks of a stage holds its experts, written by world / (EP x ETP x PP) ranks. Host memory a save needs beyond the model: with ``async_save`` the
rank's share staged in host memory; with ``unified_checkpoint`` the whole optimizer state of the shard,
gathered on data-parallel rank 0. The non-finite check needs no buffer (one min/max reduction).

Training FLOPs per token at ``max_seq_len`` follow Megatron-LM (:mod:`megatron_prm.flops`); the PRM head
reads two rows of the LM head, so the PRM's figure leaves the full-vocabulary logits out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.flops import ModelShape, flops_per_token
from megatron_prm.layout import ParallelLayout, resolve_layout
from megatron_prm.model.architecture import Architecture
from megatron_prm.model.mlp_head import mlp_head_parameters
from megatron_prm.model.provider import padded_vocab_size

GIB = 2**30


@dataclass(frozen=True)
class StageParameters:
    embedding: int
    layers: int
    output_layer: int
    final_norm: int
    reward_head: int = 0  # reward_head: mlp (the lm_head reward reads rows of the output layer)
    output_layer_frozen: bool = False  # reward_head: mlp with untied embeddings: the LM head is unused
    experts: int = 0  # of ``layers``: the routed experts' parameters (MoE bases)

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.output_layer + self.final_norm + self.reward_head

    @property
    def trainable(self) -> int:
        """What has gradients and optimizer state (Megatron's DDP and optimizer skip frozen parameters)."""
        return self.total - (self.output_layer if self.output_layer_frozen else 0)


def _swiglu(h: int, f: int) -> int:
    return 3 * h * f  # gate, up and down projections


def layer_parameters(arch: Architecture, layer: int, tp: int, ep: int = 1, etp: Optional[int] = None) -> int:
    """Parameters of transformer layer ``layer`` held by one rank. A MoE layer's rank holds ``1 / ep`` of the
    experts, each split over ``etp`` (default ``tp``) expert-tensor-parallel ranks, the shared expert split
    like the dense MLP, and the router (and Qwen2-MoE's shared-expert gate) whole."""
    h, d = arch.hidden_size, arch.head_dim
    n, g = arch.num_attention_heads, arch.num_key_value_heads
    sharded = (n + 2 * g) * d * h + h * n * d
    if arch.family.qkv_bias:
        sharded += (n + 2 * g) * d
    replicated = 2 * h + (2 * d if arch.family.qk_norm else 0)  # RMSNorm weights (Qwen3: per-head Q/K norms too)
    if not arch.layer_is_sparse(layer):
        return (sharded + _swiglu(h, arch.intermediate_size)) // tp + replicated
    moe = arch.moe
    replicated += moe.num_experts * h  # the router
    if moe.shared_expert_intermediate_size:
        sharded += _swiglu(h, moe.shared_expert_intermediate_size)
        replicated += h  # its gate
    return sharded // tp + replicated + expert_parameters(arch, tp, ep, etp)


def expert_parameters(arch: Architecture, tp: int, ep: int = 1, etp: Optional[int] = None) -> int:
    """The routed experts' parameters of one MoE layer held by one rank (0 in a dense model)."""
    if arch.moe is None:
        return 0
    return arch.moe.num_experts * _swiglu(arch.hidden_size, arch.moe.moe_intermediate_size) // (ep * (etp or tp))


def model_parameters(arch: Architecture) -> dict[str, int]:
    """Parameters of the base model (the unpadded vocabulary, as HF counts them; no MLP reward head), and those a token
    passes through: of a MoE layer only its ``num_experts_per_tok`` routed experts (with the router and
    the shared expert); equal in a dense model."""
    layers = sum(layer_parameters(arch, layer, 1) for layer in range(arch.num_hidden_layers))
    inactive = 0
    if arch.moe is not None:
        moe = arch.moe
        inactive = (moe.num_experts - moe.num_experts_per_tok) * _swiglu(arch.hidden_size, moe.moe_intermediate_size)
    vocab = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    total = layers + vocab + arch.hidden_size
    return {"total": total, "active_per_token": total - arch.sparse_layer_count * inactive}


def stage_layers(arch: Architecture, layout: ParallelLayout, stage: int) -> list[int]:
    """The layers on pipeline stage ``stage``: its virtual chunks ``stage``, ``stage + pp``, ... of
    ``layers / (pp x vpp)`` consecutive layers each, as Megatron-Core assigns them."""
    pp = layout.pipeline_parallel_size
    per_chunk = arch.num_hidden_layers // (pp * layout.virtual_pipeline_parallel_size)
    return [layer for layer in range(arch.num_hidden_layers) if layer // per_chunk % pp == stage]


def stage_parameters(arch: Architecture, layout: ParallelLayout, stage: int) -> StageParameters:
    """Parameters on one GPU of pipeline stage ``stage`` (all its virtual chunks)."""
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    ep, etp = layout.expert_parallel_size, layout.expert_tensor_size
    vocab_rows = padded_vocab_size(arch.vocab_size, tp) // tp * arch.hidden_size
    first, last = stage == 0, stage == pp - 1
    has_output = last and (not arch.tie_word_embeddings or pp > 1)  # tied + PP: the last stage keeps a copy
    layers = stage_layers(arch, layout, stage)
    return StageParameters(
        embedding=vocab_rows if first else 0,
        layers=sum(layer_parameters(arch, layer, tp, ep, etp) for layer in layers),
        output_layer=vocab_rows if has_output else 0,
        final_norm=arch.hidden_size if last else 0,
        reward_head=mlp_head_parameters(arch.hidden_size) if last and arch.reward_head == "mlp" else 0,
        output_layer_frozen=arch.reward_head == "mlp" and not arch.tie_word_embeddings,
        experts=sum(arch.layer_is_sparse(layer) for layer in layers) * expert_parameters(arch, tp, ep, etp),
    )


def activation_bytes(arch: Architecture, layout: ParallelLayout, tokens: int, recompute: bool) -> int:
    """Activations kept for the backward pass on the first pipeline stage (see the module docstring)."""
    h, f, tp, pp = arch.hidden_size, arch.intermediate_size, layout.tensor_parallel_size, layout.pipeline_parallel_size
    local_tokens = tokens / layout.context_parallel_size  # each context-parallel rank holds 1/CP of the sequence
    # Without sequence parallelism the layer inputs, norms and residuals (the 10 s h) are whole on every
    # tensor-parallel rank; only the attention and MLP internals are split.
    sequence_split = tp if layout.sequence_parallel else 1
    per_layer = local_tokens * h * (10 / sequence_split + 24 * f / (4 * h) / tp)
    layers = arch.num_hidden_layers // pp
    if recompute:
        kept = layers * 2 * local_tokens * h / sequence_split + per_layer
    else:
        kept = layers * per_layer
    return int(kept * pp)


def checkpoint_figures(config: RunConfig, layout: ParallelLayout, stages: list[StageParameters]) -> dict:
    """Bytes of one checkpoint and what each rank writes and holds in host memory per save (see the
    module docstring). A stage's routed experts (MoE bases) are held by each of its EP x ETP ranks, their
    own, and saved by the stage's world / (EP x ETP x PP) expert-data-parallel ranks, while the rest is
    split over TP and saved by the DP ranks."""
    t = config.training
    half = t.bf16 or t.fp16
    # Stored optimizer state: Adam's two moments, plus fp32 main weights under bf16/fp16 and always with
    # the distributed optimizer (its dp_reshardable state stores the main parameter even in fp32).
    state = 12 if half or layout.distributed_optimizer else 8
    weight = 2 if half else 4
    tp, dp = layout.tensor_parallel_size, layout.data_parallel_size
    expert_ranks = layout.expert_parallel_size * layout.expert_tensor_size
    expert_data_parallel = tp * layout.context_parallel_size * dp // expert_ranks
    dense_bytes = [(s.total - s.experts) * weight + (s.trainable - s.experts) * state for s in stages]
    expert_bytes = [s.experts * (weight + state) for s in stages]
    written = max(math.ceil(dense / dp) + math.ceil(experts / expert_data_parallel)
                  for dense, experts in zip(dense_bytes, expert_bytes))
    gathered = 0
    if t.unified_checkpoint and layout.distributed_optimizer:
        heaviest = max(stages, key=lambda s: s.trainable)
        gathered = heaviest.trainable * state
    return {
        "checkpoint_bytes": sum(dense_bytes) * tp + sum(expert_bytes) * expert_ranks,
        "written_per_rank_bytes": written,
        "host_staging_per_rank_bytes": written if t.async_save else 0,
        "gathered_on_data_parallel_rank0_bytes": gathered,
    }


def plan(config: RunConfig, arch: Architecture, nodes: int, gpus_per_node: int, gpu_memory_gib: float) -> dict:
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
    world = nodes * gpus_per_node
    layout, notes = resolve_layout(config, world, arch)
    t = config.training
    accumulation = t.gradient_accumulation_steps
    stages = [stage_parameters(arch, layout, s) for s in range(layout.pipeline_parallel_size)]
    heaviest = max(stages, key=lambda s: s.total)
    params, trainable = heaviest.total, heaviest.trainable
    half = t.bf16 or t.fp16
    optimizer_bytes = trainable * (12 if half else 8)
    experts = heaviest.experts
    if layout.distributed_optimizer:
        # The experts' state is sharded over the expert-data-parallel ranks (world / (EP x ETP x PP)), the
        # rest over the data-parallel ones, as Megatron's distributed optimizer keeps two groups.
        expert_data_parallel = world // (layout.expert_parallel_size * layout.expert_tensor_size
                                         * layout.pipeline_parallel_size)
        per_parameter = 12 if half else 8
        optimizer_bytes = (math.ceil((trainable - experts) * per_parameter / layout.data_parallel_size)
                           + math.ceil(experts * per_parameter / expert_data_parallel))
    seq_len = config.data.max_seq_len
    tokens = seq_len * t.per_device_train_batch_size
    shape = ModelShape.from_architecture(arch, padded_vocab_size(arch.vocab_size, layout.tensor_parallel_size))
    memory = {
        "weights": params * (2 if half else 4),
        "gradients": trainable * 4,
        "optimizer": optimizer_bytes,
        "activations": activation_bytes(arch, layout, tokens, recompute=False),
        "activations_with_full_recompute": activation_bytes(arch, layout, tokens, recompute=True),
    }
    active = memory["activations_with_full_recompute"] if config.parallel.recompute else memory["activations"]
    total = memory["weights"] + memory["gradients"] + memory["optimizer"] + active
    result = {
        "world_size": world,
        "layout": {"tensor": layout.tensor_parallel_size, "context": layout.context_parallel_size,
                   "expert": layout.expert_parallel_size, "expert_tensor": layout.expert_tensor_size,
                   "pipeline": layout.pipeline_parallel_size,
                   "virtual_pipeline": layout.virtual_pipeline_parallel_size, "data": layout.data_parallel_size,
                   "sequence_parallel": layout.sequence_parallel,
                   "distributed_optimizer": layout.distributed_optimizer},
        "microbatches_per_step": accumulation,
        "global_batch_size": t.per_device_train_batch_size * accumulation * layout.data_parallel_size,
        "parameters": model_parameters(arch),
        "parameters_per_gpu": params,
        "parameters_per_stage": [s.total for s in stages],
        "memory_bytes": memory,
        "recompute": config.parallel.recompute,
        "estimated_total_bytes": total,
        "gpu_memory_bytes": int(gpu_memory_gib * GIB),
        "checkpoint": checkpoint_figures(config, layout, stages),
        "flops_per_token": flops_per_token(shape, seq_len, with_logits=False),
        "flops_per_token_with_lm_logits": flops_per_token(shape, seq_len, with_logits=True),
        "notes": notes,
    }
    if total > gpu_memory_gib * GIB:
        raise ConfigError(
            f"the layout does not fit: about {total / GIB:.1f} GiB per GPU (weights {memory['weights'] / GIB:.1f}, "
            f"gradients {memory['gradients'] / GIB:.1f}, optimizer {memory['optimizer'] / GIB:.1f}, activations "
            f"{active / GIB:.1f}) > {gpu_memory_gib} GiB; raise tensor/pipeline parallelism, use sharding: stage1, "
            "or recompute")
    return result


def describe(result: dict) -> str:
    layout = result["layout"]
    memory = result["memory_bytes"]
    lines = [
        f"world size {result['world_size']}: TP {layout['tensor']} x CP {layout['context']} x PP {layout['pipeline']} (VPP "
        f"{layout['virtual_pipeline']}) x DP {layout['data']}; sequence parallel {layout['sequence_parallel']}, "
        f"distributed optimizer {layout['distributed_optimizer']}; experts EP {layout['expert']} x ETP "
        f"{layout['expert_tensor']}",
        f"{result['microbatches_per_step']} micro batches per step per data-parallel rank; global batch "
        f"{result['global_batch_size']} rows",
        f"parameters: {result['parameters']['total'] / 1e9:.3f} B in all, "
        f"{result['parameters']['active_per_token'] / 1e9:.3f} B active per token",
        f"parameters per GPU (heaviest stage): {result['parameters_per_gpu'] / 1e9:.3f} B; per stage: "
        + ", ".join(f"{p / 1e9:.3f} B" for p in result["parameters_per_stage"]),
        "memory per GPU (estimate): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items()),
        f"total with recompute={result['recompute']}: {result['estimated_total_bytes'] / GIB:.2f} GiB of "
        f"{result['gpu_memory_bytes'] / GIB:.0f} GiB",
        "checkpoint per save: {:.2f} GiB in all, {:.2f} GiB written by each rank (no gather){}{}".format(
            result["checkpoint"]["checkpoint_bytes"] / GIB, result["checkpoint"]["written_per_rank_bytes"] / GIB,
            f"; {result['checkpoint']['host_staging_per_rank_bytes'] / GIB:.2f} GiB host memory per rank to stage "
            "it (async_save)" if result["checkpoint"]["host_staging_per_rank_bytes"] else "",
            f"; unified_checkpoint gathers {result['checkpoint']['gathered_on_data_parallel_rank0_bytes'] / GIB:.2f}"
            " GiB of optimizer state on data-parallel rank 0" if result["checkpoint"][
                "gathered_on_data_parallel_rank0_bytes"] else ""),
        f"training FLOPs per token at max_seq_len (Megatron-LM's formula): {result['flops_per_token']:.4e} "
        f"({result['flops_per_token_with_lm_logits']:.4e} with full-vocabulary logits, as LM training)",
    ]
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])
