"""Exact causal attention under context parallelism without Transformer Engine.

Each context-parallel rank holds two chunks of every sequence (:mod:`megatron_prm.context_chunks`).
Keys and values are all-gathered over the context-parallel group and put back in row order; each of the
rank's query chunks then attends the sequence's keys up to its own end, causally aligned at the lower
right (the query at chunk offset ``i`` sees keys ``0 .. start + i``), by PyTorch's scaled-dot-product
attention (with a boolean mask that is not kept for the backward pass, see :func:`attend_chunk`). This is the approach Llama 3 used for long context: the keys and values cross ranks once per
layer (``2 x groups x head_dim`` per token, small under grouped-query attention), and the backward pass
reduce-scatters their gradients back to the ranks that own them (Megatron-Core's
``gather_from_sequence_parallel_region`` over the context-parallel group).

A packed (THD) row is attended sample by sample; every sample's padding follows its real tokens, so
causality keeps it out of them. Transformer Engine's own context-parallel attention (p2p ring, a2a,
all-gather) replaces this module on GPUs with TE.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_prm.context_chunks import gathered_order

# (query, key, value) [batch, heads, seq, dim] and the keys before the first query -> output
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def lower_right_causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Query ``i`` of the last ``queries`` positions of ``keys`` sees keys ``0 .. keys - queries + i``."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


def attend_chunk(attend: Attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A query chunk ``[b, heads, q, d]`` that ends the keys ``[b, groups, k, d]``, causally aligned at the
    lower right. A chunk that is the whole prefix (the square case) is plain causal attention; any other
    needs a ``q x k`` boolean mask, which is rebuilt in the backward pass instead of being kept (the
    attention of such a chunk is recomputed): kept, it would cost about as much memory as the layer's
    activations on long sequences."""
    queries, keys = query.shape[2], key.shape[2]
    if queries == keys:
        return attend(query, key, value, None)

    def masked(query, key, value):
        return attend(query, key, value, lower_right_causal_mask(queries, keys, query.device))

    return torch.utils.checkpoint.checkpoint(masked, query, key, value, use_reentrant=False)


def gather_in_row_order(local: torch.Tensor, offsets: Optional[Sequence[int]], cp_group) -> torch.Tensor:
    """Every rank's share of ``local`` (sequence first) gathered and put back in row order; its gradient
    goes back to the owners."""
    gathered = gather_from_sequence_parallel_region(local.contiguous(), tensor_parallel_output_grad=True, group=cp_group)
    length = gathered.shape[0]
    order = torch.from_numpy(gathered_order(length, offsets, cp_group.size())).to(local.device)
    return gathered.index_select(0, order)


def _chunk_spans(length: int, cp_rank: int, cp_size: int) -> list[tuple[int, int, int]]:
    """``(local start, row start, size)`` of this rank's two chunks of a sequence of ``length`` tokens."""
    chunk = length // (2 * cp_size)
    return [(0, cp_rank * chunk, chunk), (chunk, (2 * cp_size - 1 - cp_rank) * chunk, chunk)]


def padded_context_parallel_attention(query, key, value, attend: Attend, cp_group) -> torch.Tensor:
    """``[s/CP, b, heads, d]`` query and ``[s/CP, b, groups, d]`` key/value -> ``[s/CP, b, heads, d]``."""
    keys, values = (gather_in_row_order(t, None, cp_group) for t in (key, value))
    outputs = []
    for local_start, row_start, size in _chunk_spans(keys.shape[0], cp_group.rank(), cp_group.size()):
        q = query[local_start:local_start + size].permute(1, 2, 0, 3)
        k, v = (t[:row_start + size].permute(1, 2, 0, 3) for t in (keys, values))
        outputs.append(attend_chunk(attend, q, k, v).permute(2, 0, 1, 3))
    return torch.cat(outputs)


def packed_context_parallel_attention(query, key, value, offsets: Sequence[int], attend: Attend, cp_group) -> torch.Tensor:
    """``[t/CP, heads, d]`` query and ``[t/CP, groups, d]`` key/value of a packed row whose samples' padded
    offsets in the whole row are ``offsets`` -> ``[t/CP, heads, d]``."""
    keys, values = (gather_in_row_order(t, offsets, cp_group) for t in (key, value))
    cp_rank, cp_size = cp_group.rank(), cp_group.size()
    outputs = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        local_base = start // cp_size
        for local_start, row_start, size in _chunk_spans(end - start, cp_rank, cp_size):
            q = query[local_base + local_start:local_base + local_start + size].transpose(0, 1).unsqueeze(0)
            k, v = (t[start:start + row_start + size].transpose(0, 1).unsqueeze(0) for t in (keys, values))
            outputs.append(attend_chunk(attend, q, k, v)[0].transpose(0, 1))
    return torch.cat(outputs)
