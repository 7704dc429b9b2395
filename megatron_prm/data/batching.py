"""Samples -> micro batches (padded, or packed into THD rows), and the evaluation batches.

Which samples each rank trains on at each step (and where a resumed run continues) is
:mod:`megatron_prm.data.loader`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prm.data.packing import PackingOptions, RowLayout
from megatron_prm.data.samples import Sample


_TENSORS = ("tokens", "position_ids", "real_tokens", "reward_index", "label_values", "record_ids", "step_ids")


@dataclass
class MicroBatch:
    """One micro batch: padded rows, or (with ``cu_seqlens``) one packed THD row.

    ``reward_index`` holds ``(row, position)`` of every labelled placeholder; ``record_ids`` and
    ``step_ids`` say which record and step each label belongs to (for per-record metrics).
    A packed row has ``cu_seqlens`` (cumulative real lengths of its samples) and
    ``cu_seqlens_padded`` (their offsets in the row, padding included), both int32 and starting at 0.
    """

    tokens: torch.Tensor  # int64 [b, s]
    position_ids: torch.Tensor  # int64 [b, s]
    real_tokens: torch.Tensor  # bool [b, s]: False at padding (transformers' attention_mask)
    reward_index: torch.Tensor  # int64 [n, 2]
    label_values: torch.Tensor  # float32 [n]
    record_ids: torch.Tensor  # int64 [n]
    step_ids: torch.Tensor  # int64 [n]
    num_real_tokens: int
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [k + 1]
    cu_seqlens_padded: Optional[torch.Tensor] = None  # int32 [k + 1]

    def to(self, device: torch.device | str) -> "MicroBatch":
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        packed = {name: None if getattr(self, name) is None else getattr(self, name).to(device)
                  for name in ("cu_seqlens", "cu_seqlens_padded")}
        return MicroBatch(**moved, num_real_tokens=self.num_real_tokens, **packed)

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0] if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def packed_seq_params(self) -> Optional[PackedSeqParams]:
        """Megatron-Core's description of a packed row (THD), or None for padded rows."""
        if self.cu_seqlens is None:
            return None
        longest = int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )


def _labels(samples: Sequence[Sample], rows: Sequence[int], offsets: Sequence[int]) -> dict[str, torch.Tensor]:
    """Label tensors of samples placed at ``(row, offset)``."""
    reward_rows, reward_cols, values, record_ids, step_ids = [], [], [], [], []
    for sample, row, offset in zip(samples, rows, offsets):
        n = len(sample.label_positions)
        reward_rows.append(np.full(n, row, dtype=np.int64))
        reward_cols.append(sample.label_positions.astype(np.int64) + offset)
        values.append(sample.label_values)
        record_ids.append(np.full(n, sample.record_index, dtype=np.int64))
        step_ids.append(sample.step_ids.astype(np.int64))
    return {
        "reward_index": torch.from_numpy(np.stack([np.concatenate(reward_rows), np.concatenate(reward_cols)], axis=1)),
        "label_values": torch.from_numpy(np.concatenate(values).astype(np.float32)),
        "record_ids": torch.from_numpy(np.concatenate(record_ids)),
        "step_ids": torch.from_numpy(np.concatenate(step_ids)),
    }


def collate_packed(samples: Sequence[Sample], pad_id: int, options: PackingOptions) -> MicroBatch:
    """One THD row: the samples back to back (each padded to ``options.sample_multiple``, the row to
    ``options.row_multiple``), position ids restarting at 0 in every sample, labels shifted along."""
    if not samples:
        raise ValueError("cannot pack an empty row")
    layout = RowLayout.of([len(s) for s in samples], options)
    tokens = torch.full((1, layout.length), pad_id, dtype=torch.int64)
    real = torch.zeros((1, layout.length), dtype=torch.bool)
    positions = torch.arange(layout.length, dtype=torch.int64)
    for sample, start, end in zip(samples, layout.cu_seqlens_padded[:-1], layout.cu_seqlens_padded[1:]):
        tokens[0, start:start + len(sample)] = torch.from_numpy(sample.input_ids.astype(np.int64))
        real[0, start:start + len(sample)] = True
        positions[start:end] = torch.arange(end - start)
    return MicroBatch(
        tokens=tokens,
        position_ids=positions.unsqueeze(0),
        real_tokens=real,
        **_labels(samples, [0] * len(samples), layout.cu_seqlens_padded[:-1].tolist()),
        num_real_tokens=sum(len(s) for s in samples),
        cu_seqlens=torch.from_numpy(layout.cu_seqlens),
        cu_seqlens_padded=torch.from_numpy(layout.cu_seqlens_padded),
    )


def collate(samples: Sequence[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> MicroBatch:
    """Right-pad to the longest sample. Causal attention keeps padding out of every real position."""
    if not samples:
        raise ValueError("cannot collate an empty micro batch")
    longest = max(len(s) for s in samples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(samples), length), pad_id, dtype=torch.int64)
    real = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        tokens[row, : len(sample)] = torch.from_numpy(sample.input_ids.astype(np.int64))
        real[row, : len(sample)] = True
    return MicroBatch(
        tokens=tokens,
        position_ids=torch.arange(length, dtype=torch.int64).expand(len(samples), length).contiguous(),
        real_tokens=real,
        **_labels(samples, range(len(samples)), [0] * len(samples)),
        num_real_tokens=sum(len(s) for s in samples),
    )


def pad_to_length(batch: MicroBatch, length: int, pad_id: int) -> MicroBatch:
    """``batch`` right-padded to ``length`` tokens (pipeline stages exchange fixed shapes). In a packed
    row the added padding belongs to the last sample's padded span."""
    rows, current = batch.tokens.shape
    if current == length:
        return batch
    tokens = torch.full((rows, length), pad_id, dtype=batch.tokens.dtype)
    tokens[:, :current] = batch.tokens
    real = torch.zeros((rows, length), dtype=torch.bool)
    real[:, :current] = batch.real_tokens
    positions = torch.cat([batch.position_ids, batch.position_ids[:, -1:] + torch.arange(1, length - current + 1)], 1)
    padded = None
    if batch.cu_seqlens_padded is not None:
        padded = batch.cu_seqlens_padded.clone()
        padded[-1] = length
    return replace(batch, tokens=tokens, position_ids=positions, real_tokens=real, cu_seqlens_padded=padded)


def without_labels(batch: MicroBatch) -> MicroBatch:
    """The same tokens with no labelled step: a microbatch that only fills a pipeline schedule."""
    empty = torch.zeros(0, dtype=torch.int64)
    return replace(batch, reward_index=torch.zeros(0, 2, dtype=torch.int64), label_values=torch.zeros(0),
                   record_ids=empty, step_ids=empty, num_real_tokens=0)


@dataclass(frozen=True)
class Collator:
    """Samples -> micro batches for one schedule call.

    ``multiple``: sequence lengths are padded to it (tensor parallel size under sequence
    parallelism). ``packing``: each group of samples becomes one packed THD row instead of padded rows.
    ``uniform_length``: all micro batches of the call get one length (pipeline stages exchange fixed
    shapes). ``fixed_length``: every micro batch is padded to exactly this many tokens (Transformer
    Engine's userbuffers for tensor-parallel communication overlap have one fixed shape).
    """

    pad_id: int
    multiple: int = 1
    uniform_length: bool = False
    packing: Optional[PackingOptions] = None
    fixed_length: Optional[int] = None

    def __call__(self, groups: Sequence[Sequence[Sample]]) -> list[MicroBatch]:
        if self.packing is not None:
            batches = [collate_packed(group, self.pad_id, self.packing) for group in groups]
        else:
            batches = [collate(group, self.pad_id, self.multiple) for group in groups]
        if (self.uniform_length or self.fixed_length) and batches:
            length = self.fixed_length or max(b.tokens.shape[1] for b in batches)
            batches = [pad_to_length(b, length, self.pad_id) for b in batches]
        return batches


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    num_microbatches: int
    data_parallel_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.data_parallel_size


def eval_microbatches(
    lengths: Sequence[int], micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int
) -> list[np.ndarray]:
    """Length-sorted micro batches dealt round-robin over data-parallel ranks; each sample once."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return batches[data_parallel_rank::data_parallel_size]
