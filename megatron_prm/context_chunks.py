"""Which positions of a sequence each context-parallel rank holds (Megatron's load-balanced order).

A sequence of ``S`` tokens is cut into ``2 x CP`` equal chunks and rank ``r`` holds chunks ``r`` and
``2 CP - 1 - r``, so under causal attention every rank does the same work (an early chunk attends few
keys, a late one many). A padded row is one sequence; a packed (THD) row is cut sample by sample, each
sample's padded span into its own chunks: the layout Transformer Engine's THD context parallelism and
Megatron-Core's THD RoPE expect. The data side (:mod:`megatron_prm.data.context_split`) and the
attention without TE (:mod:`megatron_prm.model.context_parallel_attention`) both read it from here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def chunk_indices(length: int, cp_rank: int, cp_size: int) -> np.ndarray:
    """Positions ``[0, length)`` that rank ``cp_rank`` holds: chunks ``r`` and ``2 CP - 1 - r``."""
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} tokens cannot be cut into 2 x {cp_size} equal chunks")
    chunk = length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return np.concatenate([np.arange(first * chunk, (first + 1) * chunk),
                           np.arange(second * chunk, (second + 1) * chunk)])


def rank_positions(length: int, offsets: Optional[Sequence[int]], cp_rank: int, cp_size: int) -> np.ndarray:
    """The positions of a row of ``length`` tokens that make rank ``cp_rank``'s share, in its order:
    the whole row as one sequence, or with ``offsets`` (a packed row's padded sample offsets, the last
    one ``length``) each sample's own chunks."""
    if offsets is None:
        return chunk_indices(length, cp_rank, cp_size)
    if offsets[-1] != length:
        raise ValueError("a packed row's padded samples must fill the row under context parallelism")
    return np.concatenate([start + chunk_indices(end - start, cp_rank, cp_size)
                           for start, end in zip(offsets[:-1], offsets[1:])])


def gathered_order(length: int, offsets: Optional[Sequence[int]], cp_size: int) -> np.ndarray:
    """The permutation that puts the ranks' shares, concatenated in rank order (an all-gather), back into
    row order: ``row = gathered[order]``."""
    held = np.concatenate([rank_positions(length, offsets, rank, cp_size) for rank in range(cp_size)])
    return np.argsort(held, kind="stable")
