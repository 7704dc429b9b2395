"""Reward-token logits from the LM-head rows of the reward tokens, never the full vocabulary.

At a placeholder position with final hidden state ``h`` the PRM's classifier logits are
``h . W[good]`` and ``h . W[bad]``, where ``W`` is the LM head (or the tied input embedding). This costs
``n x h x 2`` multiply-adds instead of ``s x h x V/TP`` plus a gather (the defects of PaddleNLP, which
indexes sharded logits without a gather, and MindSpeed-LLM, which all-gathers the full vocabulary).

Under tensor parallelism the labelled rows are selected first and only what the head needs crosses
ranks, never the ``[s, b, h]`` hidden states or their gradient:

- ``W`` is split by vocabulary rows, so each reward row lives on one rank (possibly two different
  ranks). The two rows are made whole on every rank by an all-reduce of ``[2, h]`` (each row has one
  non-zero contribution, so the sum is exact).
- Without sequence parallelism the decoder output is replicated: every rank selects the ``n`` labelled
  rows itself. With it, each rank holds ``s / TP`` positions: it fills the labelled rows it holds and
  the ``[n, h]`` rows are all-reduced (again one non-zero contribution per row).
- Every rank then computes the same logits and loss, and so the same full gradient of the selected
  rows and of the two weight rows: the backward pass needs no collective. Each rank keeps the
  gradient of the positions and weight rows it holds.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def select_positions(hidden_states: torch.Tensor, reward_index: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` [s, b, h] at ``reward_index`` rows of (batch row, position) -> [n, h]."""
    return hidden_states[reward_index[:, 1], reward_index[:, 0]]


def labelled_rows(
    hidden_states: torch.Tensor,
    reward_index: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup,
    sequence_parallel: bool,
) -> torch.Tensor:
    """The hidden states at the ``n`` labelled positions, ``[n, h]``, whole on every tensor-parallel rank.

    hidden_states: decoder output ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism).
    The only collective (sequence parallelism only) is an all-reduce of the ``[n, h]`` rows; its
    backward is the identity, since every rank computes the same gradient of them.
    """
    if not sequence_parallel or tp_group.size() == 1:
        return select_positions(hidden_states, reward_index)
    local_length = hidden_states.shape[0]
    local_positions = reward_index[:, 1] - tp_group.rank() * local_length
    held = (local_positions >= 0) & (local_positions < local_length)
    rows = hidden_states[local_positions.clamp(0, local_length - 1), reward_index[:, 0]]
    rows = torch.where(held.unsqueeze(1), rows, torch.zeros_like(rows))
    return reduce_from_tensor_model_parallel_region(rows, group=tp_group)


def reward_rows(
    weight_shard: torch.Tensor, reward_ids: torch.Tensor, tp_group: torch.distributed.ProcessGroup
) -> torch.Tensor:
    """The LM-head rows of the reward tokens, ``[2, h]``, whole on every tensor-parallel rank.

    weight_shard: this rank's vocabulary rows of the LM head, ``[V/TP, h]``. Each rank contributes the
    rows it owns (zeros for the others) to an all-reduce of ``[2, h]``; in the backward pass each rank
    keeps the gradient of the rows it owns.
    """
    rows_per_rank = weight_shard.shape[0]
    local_ids = reward_ids - tp_group.rank() * rows_per_rank
    owned = (local_ids >= 0) & (local_ids < rows_per_rank)
    rows = weight_shard[local_ids.clamp(0, rows_per_rank - 1)]
    rows = torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))
    return reduce_from_tensor_model_parallel_region(rows, group=tp_group)


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
    selected = labelled_rows(hidden_states, reward_index, tp_group, sequence_parallel).float()
    return selected @ reward_rows(weight_shard, reward_ids, tp_group).float().t()
