"""Reward-token logits from the LM-head rows of the reward tokens, never the full vocabulary.

At a placeholder position with final hidden state ``h`` the PRM's classifier logits are
``h . W[good]`` and ``h . W[bad]``, where ``W`` is the LM head (or the tied input embedding).
Under tensor parallelism ``W`` is split by vocabulary rows: each reward row lives on the rank that
owns it, possibly two different ranks. Every rank multiplies by the reward rows it owns (zeros for
the others) and the partial logits are summed over the tensor-parallel group. This costs
``n x h x 2`` multiply-adds instead of ``s x h x V/TP`` plus a gather (the defects of PaddleNLP, which
indexes sharded logits without a gather, and MindSpeed-LLM, which all-gathers the full vocabulary).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def select_positions(hidden_states: torch.Tensor, reward_index: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` [s, b, h] at ``reward_index`` rows of (batch row, position) -> [n, h]."""
    return hidden_states[reward_index[:, 1], reward_index[:, 0]]


def reward_logits(
    hidden_states: torch.Tensor,
    reward_index: torch.Tensor,
    weight_shard: torch.Tensor,
    reward_ids: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup,
    sequence_parallel: bool,
) -> torch.Tensor:
    """Logits ``[n, 2]`` (good, bad), in float32, at the ``n`` labelled positions.

    hidden_states: decoder output ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism).
    weight_shard: this rank's vocabulary rows of the LM head, ``[V/TP, h]``.
    """
    if sequence_parallel:
        # All-gather forward; reduce-scatter backward sums each rank's share of dL/dh.
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
    else:
        # Identity forward; all-reduce backward, since only the owning ranks contribute to dL/dh.
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    selected = select_positions(hidden_states, reward_index).float()

    rows_per_rank = weight_shard.shape[0]
    first_row = tp_group.rank() * rows_per_rank if tp_group.size() > 1 else 0
    local_ids = reward_ids - first_row
    owned = (local_ids >= 0) & (local_ids < rows_per_rank)
    rows = weight_shard[local_ids.clamp(0, rows_per_rank - 1)].float() * owned.unsqueeze(1)
    partial = selected @ rows.t()
    return reduce_from_tensor_model_parallel_region(partial, group=tp_group)
