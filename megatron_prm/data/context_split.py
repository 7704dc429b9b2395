"""A micro batch cut into one context-parallel rank's share of every sequence
(:mod:`megatron_prm.context_chunks`: a padded row as one sequence, a packed row sample by sample, each
sample's padded span a multiple of ``2 x CP``; ``cu_seqlens`` stay those of the whole row).

Labels travel with their tokens: a placeholder in a rank's chunks stays on that rank, at its position in
the rank's share; the others' labels are left out, so each rank's loss sums its own labelled steps and
Megatron-Core divides by the count over data x context parallel ranks.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from megatron_prm.context_chunks import rank_positions
from megatron_prm.data.batching import MicroBatch


def split_for_context_parallel(batch: MicroBatch, cp_rank: int, cp_size: int) -> MicroBatch:
    """This rank's share of ``batch`` (on the CPU, before it moves to the device): its chunks of every
    sequence and the labels that lie in them."""
    if cp_size == 1:
        return batch
    offsets = None if batch.cu_seqlens_padded is None else batch.cu_seqlens_padded.tolist()
    positions = rank_positions(batch.tokens.shape[1], offsets, cp_rank, cp_size)
    local_of = np.full(batch.tokens.shape[1], -1, dtype=np.int64)
    local_of[positions] = np.arange(len(positions))
    index = torch.from_numpy(positions)
    label_local = torch.from_numpy(local_of)[batch.reward_index[:, 1]]
    kept = label_local >= 0
    reward_index = torch.stack([batch.reward_index[:, 0][kept], label_local[kept]], dim=1)
    return replace(
        batch,
        tokens=batch.tokens.index_select(1, index),
        position_ids=batch.position_ids.index_select(1, index),
        real_tokens=batch.real_tokens.index_select(1, index),
        reward_index=reward_index,
        label_values=batch.label_values[kept],
        record_ids=batch.record_ids[kept],
        step_ids=batch.step_ids[kept],
    )
