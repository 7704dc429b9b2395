"""The parallel layout of a run, derived from the world size and checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_prm.config import ConfigError, RunConfig
from megatron_prm.model.architecture import Architecture


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    context_parallel_size: int = 1
    cp_comm_type: str = "p2p"
    expert_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: tensor_parallel_size, as Megatron-Core defaults

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_parallel_size

    @property
    def world_size(self) -> int:
        return (self.tensor_parallel_size * self.context_parallel_size * self.pipeline_parallel_size
                * self.data_parallel_size)

    @property
    def sample_multiple(self) -> int:
        """Every sample of a packed row is padded to a multiple of this: context parallelism cuts each
        sample into 2 x CP chunks."""
        return 2 * self.context_parallel_size if self.context_parallel_size > 1 else 1

    @property
    def sequence_multiple(self) -> int:
        """Every packed or padded sequence length must be a multiple of this: 2 x CP chunks, each rank's
        part split over the tensor-parallel ranks under sequence parallelism."""
        return self.sample_multiple * (self.tensor_parallel_size if self.sequence_parallel else 1)


def model_split_problems(arch: Architecture, tp: int, pp: int, vpp: int = 1, ep: int = 1,
                         etp: Optional[int] = None) -> list[str]:
    """Why the model cannot be cut into ``tp`` tensor and ``pp`` x ``vpp`` pipeline parts, its experts over
    ``ep`` ranks, each split ``etp`` ways (None: ``tp``) (empty: it can)."""
    problems = []
    if arch.num_hidden_layers % (pp * vpp):
        problems.append(
            f"num_hidden_layers {arch.num_hidden_layers} is not divisible by pipeline_parallel_degree {pp} x "
            f"virtual_pp_degree {vpp} = {pp * vpp}"
        )
    if arch.num_attention_heads % tp:
        problems.append(f"num_attention_heads {arch.num_attention_heads} is not divisible by tensor_parallel_degree {tp}")
    if arch.num_key_value_heads % tp:
        problems.append(
            f"num_key_value_heads (query groups) {arch.num_key_value_heads} is not divisible by tensor_parallel_degree {tp}"
        )
    if arch.intermediate_size % tp and arch.sparse_layer_count < arch.num_hidden_layers:  # a dense MLP
        problems.append(f"intermediate_size {arch.intermediate_size} is not divisible by tensor_parallel_degree {tp}")
    return problems + _expert_split_problems(arch, tp, ep, etp or tp)


def _expert_split_problems(arch: Architecture, tp: int, ep: int, etp: int) -> list[str]:
    moe = arch.moe
    if moe is None:
        return [] if ep == 1 and etp == tp else [
            f"expert_parallel_degree / expert_tensor_parallel_degree apply to Mixture-of-Experts models only; "
            f"{arch.model_type} has no experts"]
    problems = []
    if moe.num_experts % ep:
        problems.append(f"num_experts {moe.num_experts} is not divisible by expert_parallel_degree {ep}")
    if moe.moe_intermediate_size % etp:
        problems.append(f"moe_intermediate_size {moe.moe_intermediate_size} is not divisible by "
                        f"expert_tensor_parallel_degree {etp}")
    shared = moe.shared_expert_intermediate_size
    if shared and shared % tp:
        problems.append(f"shared_expert_intermediate_size {shared} is not divisible by tensor_parallel_degree {tp}")
    return problems


def resolve_layout(config: RunConfig, world_size: int, arch: Architecture) -> tuple[ParallelLayout, list[str]]:
    """The layout, and notes on settings that were adjusted; a ConfigError naming the clashing numbers."""
    p = config.parallel
    tp, pp, vpp, cp = p.tensor_parallel_degree, p.pipeline_parallel_degree, p.virtual_pp_degree, p.context_parallel_degree
    problems, notes = [], []
    if world_size % (tp * cp * pp):
        context = f"context_parallel_degree {cp} x " if cp > 1 else ""
        problems.append(
            f"the world size {world_size} is not divisible by tensor_parallel_degree {tp} x {context}"
            f"pipeline_parallel_degree {pp} = {tp * cp * pp}"
        )
    dp = max(world_size // (tp * cp * pp), 1)
    ep, etp = p.expert_parallel_degree, (tp if p.expert_tensor_parallel_degree == -1 else p.expert_tensor_parallel_degree)
    if world_size % (ep * etp * pp):
        problems.append(f"the world size {world_size} is not divisible by expert_parallel_degree {ep} x "
                        f"expert_tensor_parallel_degree {etp} x pipeline_parallel_degree {pp} = {ep * etp * pp}")
    problems += model_split_problems(arch, tp, pp, vpp, ep, etp)
    accumulation = config.training.gradient_accumulation_steps
    if pp > 1 and vpp > 1 and accumulation % pp:
        problems.append(
            f"the interleaved pipeline schedule needs gradient_accumulation_steps ({accumulation}) to be a "
            f"multiple of pipeline_parallel_degree {pp}"
        )
    if p.tp_comm_overlap and config.data.max_seq_len % tp:
        problems.append(
            f"tp_comm_overlap pads every sequence to max_seq_len {config.data.max_seq_len}, which must then be "
            f"divisible by tensor_parallel_degree {tp}"
        )
    if p.tp_comm_overlap and cp > 1:
        problems.append("tp_comm_overlap is not supported with context_parallel_degree > 1 here")
    if p.sharding_parallel_degree not in (-1, dp) and not problems:
        problems.append(
            f"sharding_parallel_degree {p.sharding_parallel_degree} must be -1 or the data-parallel size {dp} "
            f"(world size {world_size} / (tensor {tp} x{f' context {cp} x' if cp > 1 else ''} pipeline {pp}))"
        )
    if problems:
        raise ConfigError("impossible parallel layout: " + "; ".join(problems))
    sequence_parallel = p.sequence_parallel
    if sequence_parallel and tp == 1:
        sequence_parallel = False
        notes.append("sequence_parallel is off: it needs tensor_parallel_degree > 1")
    return ParallelLayout(tp, pp, vpp, dp, sequence_parallel, p.use_distributed_optimizer, cp, p.cp_comm_type, ep,
                          etp), notes
