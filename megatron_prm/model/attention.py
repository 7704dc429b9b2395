"""Core attention for the local layer spec that honours packed (THD) sequences.

Megatron-Core's local ``DotProductAttention`` refuses ``PackedSeqParams``; Transformer Engine's fused
attention handles THD on GPUs. Without TE (CPU, or a GPU without TE) this module takes its place. A
packed row is attended within each of its samples, causally, so a sample never sees another one:

- on CUDA in bf16/fp16, by one call of PyTorch's flash varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``, torch 2.10+) over the whole row, the samples delimited by
  ``cu_seqlens_padded`` (a sample's padding follows it, so causality keeps it out of its real tokens);
- elsewhere (CPU, fp32, attention dropout, an older torch), by PyTorch's scaled-dot-product attention
  once per sample, padding output zero.

RoPE positions are restarted per sample by Megatron's attention before this module is called (from
``cu_seqlens_padded``). Unpacked ``[s, b, h, d]`` input gets plain causal attention. Under context
parallelism every rank holds two chunks of each sequence and
:mod:`megatron_prm.model.context_parallel_attention` attends them to the gathered keys. Grouped-query
attention needs no copies of the key/value heads where the kernel takes ``enable_gqa``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_prm.model.context_parallel_attention import (
    packed_context_parallel_attention,
    padded_context_parallel_attention,
)

VARLEN = "varlen"
SDPA_PER_SAMPLE = "sdpa_per_sample"


def packed_attention_kernel(device_type: str, dtype: torch.dtype, varlen_available: bool, dropout: float) -> str:
    """Which kernel attends within the samples of a packed row: :data:`VARLEN` (flash, one call per row)
    on CUDA in half precision where torch has it and no attention dropout is asked for (the kernel has
    none), else :data:`SDPA_PER_SAMPLE`."""
    if device_type == "cuda" and varlen_available and dtype in (torch.bfloat16, torch.float16) and dropout == 0:
        return VARLEN
    return SDPA_PER_SAMPLE


@functools.lru_cache(maxsize=1)
def installed_varlen_attn() -> Optional[Callable]:
    """torch's flash varlen attention, or None where this torch has none (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class VarlenCall:
    """The arguments of one varlen attention call over a packed row."""

    args: tuple
    kwargs: dict

    def __call__(self, kernel: Callable) -> torch.Tensor:
        return kernel(*self.args, **self.kwargs)


def varlen_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams, scale: float,
                kernel_parameters: frozenset[str]) -> VarlenCall:
    """Arguments of ``varlen_attn`` for ``[t, heads, d]`` query and ``[t, groups, d]`` key/value of one row.

    Samples are delimited by their padded offsets (int32; the last one is the row's length, as
    :class:`~megatron_prm.data.batching.MicroBatch` builds them), so padding belongs to the sample it
    follows and every output row is computed. ``kernel_parameters`` names what the installed kernel
    accepts: torch 2.10 spells causality ``is_causal``, 2.11+ ``window_size=(-1, 0)``; a kernel
    without ``enable_gqa`` gets the key/value heads repeated per query group.
    """
    offsets = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    offsets = offsets.to(torch.int32)
    longest = params.max_seqlen_q
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in kernel_parameters else {"is_causal": True}
    if "scale" in kernel_parameters:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(query.shape[-1])):
        raise ValueError("this torch's varlen_attn takes no softmax scale; only 1/sqrt(head_dim) is supported")
    heads, groups = query.shape[1], key.shape[1]
    if heads != groups:
        if "enable_gqa" in kernel_parameters:
            kwargs["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(heads // groups, dim=1) for t in (key, value))
    return VarlenCall((query, key, value, offsets, offsets, longest, longest), kwargs)


class PackedSDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.cp_group = None
        if config.context_parallel_size > 1:
            cp_group = getattr(pg_collection, "cp", None)
            self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    @functools.cached_property
    def varlen_attn(self) -> Optional[Callable]:
        """Looked up at the first packed row on CUDA: importing it imports TorchDynamo (seconds)."""
        return installed_varlen_attn()

    @functools.cached_property
    def varlen_parameters(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.varlen_attn).parameters) if self.varlen_attn is not None else frozenset()

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal attention over ``[batch, heads, seq, dim]`` tensors (with ``mask``: that boolean mask)."""
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None, scale=self.scale,
                                              enable_gqa=self.groups != self.heads)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention bias is not supported")
        with self._dropout_rng():
            if self.cp_group is not None:
                return self._context_parallel(query, key, value, packed_seq_params)
            if packed_seq_params is None:
                return self._padded(query, key, value)
            on_cuda = query.device.type == "cuda"
            kernel = packed_attention_kernel(query.device.type, query.dtype, on_cuda and self.varlen_attn is not None,
                                             self.dropout if self.training else 0.0)
            if kernel == VARLEN:
                return self._packed_varlen(query, key, value, packed_seq_params)
            return self._packed(query, key, value, packed_seq_params)

    def _dropout_rng(self):
        """Dropout draws from the tensor-parallel RNG stream, as in Megatron's own attention."""
        if self.dropout > 0 and self.training and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _context_parallel(self, query, key, value, params: Optional[PackedSeqParams]) -> torch.Tensor:
        """This rank's chunks of every sequence attend the whole sequence's keys (gathered over CP)."""
        if params is None:
            out = padded_context_parallel_attention(query, key, value, self._attend, self.cp_group)
            return out.reshape(*out.shape[:2], self.heads * self.head_dim)
        offsets = (params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q).tolist()
        out = packed_context_parallel_attention(query, key, value, offsets, self._attend, self.cp_group)
        return out.reshape(query.shape[0], self.heads * self.head_dim)

    def _padded(self, query, key, value) -> torch.Tensor:
        """``[s, b, h, d]`` -> ``[s, b, h * d]``; right padding never reaches a real position."""
        seq, batch = query.shape[:2]
        out = self._attend(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * self.head_dim)

    def _packed_varlen(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        """``[t, h, d]`` -> ``[t, h * d]`` by one flash varlen call."""
        call = varlen_call(query, key, value, params, self.scale, self.varlen_parameters)
        return call(self.varlen_attn).reshape(query.shape[0], self.heads * self.head_dim)

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        """``[t, h, d]`` -> ``[t, h * d]``, one causal attention per sample; padding outputs zeros."""
        offsets = (params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q).tolist()
        lengths = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
        pieces = []
        for start, end, length in zip(offsets[:-1], offsets[1:], lengths):
            part = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            pieces.append(self._attend(*part)[0].transpose(0, 1))
            if end - start > length:
                pieces.append(query.new_zeros(end - start - length, self.heads, self.head_dim))
        total = query.shape[0]
        if offsets[-1] < total:
            pieces.append(query.new_zeros(total - offsets[-1], self.heads, self.head_dim))
        return torch.cat(pieces).reshape(total, self.heads * self.head_dim)
