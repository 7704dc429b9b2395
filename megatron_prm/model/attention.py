"""Core attention for the local layer spec that honours packed (THD) sequences.

Megatron-Core's local ``DotProductAttention`` refuses ``PackedSeqParams``; Transformer Engine's fused
attention handles THD on GPUs. Without TE (CPU, or a GPU without TE) this module takes its place:
PyTorch's scaled-dot-product attention, causal, run once per sample of a packed row, so a sample never
sees another one (and padding sees nothing). RoPE positions are restarted per sample by Megatron's
attention before this module is called (from ``cu_seqlens_padded``). Unpacked ``[s, b, h, d]`` input
gets plain causal attention. Grouped-query attention needs no copies of the key/value heads.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


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
        if config.context_parallel_size > 1:
            raise ValueError("context parallelism needs Transformer Engine's attention")
        tp = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Causal attention over ``[batch, heads, seq, dim]`` tensors."""
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                              scale=self.scale, enable_gqa=self.groups != self.heads)

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
            if packed_seq_params is None:
                return self._padded(query, key, value)
            return self._packed(query, key, value, packed_seq_params)

    def _dropout_rng(self):
        """Dropout draws from the tensor-parallel RNG stream, as in Megatron's own attention."""
        if self.dropout > 0 and self.training and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _padded(self, query, key, value) -> torch.Tensor:
        """``[s, b, h, d]`` -> ``[s, b, h * d]``; right padding never reaches a real position."""
        seq, batch = query.shape[:2]
        out = self._attend(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * self.head_dim)

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
