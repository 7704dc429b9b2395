"""Training FLOPs by Megatron-LM's formula (``num_floating_point_operations`` in
megatron/training/training.py, GQA + SwiGLU, dense or MoE, causal attention counted half since March 2025).

Per token, forward + backward (3 GEMMs each of 2 m n k FLOPs, hence the factor 6), summed over layers:
- attention: ``h (q + 2 k)`` (QKV projection) + ``q s / 2 x 2`` (QK^T and its product with V, half of the
  ``s x s`` scores under the causal mask) + ``q h`` (output projection), with ``q = n d`` and ``k = g d``;
- MLP: ``3 h f`` (SwiGLU: gate, up and down projections); in a MoE layer the active experts only,
  ``3 h (f_e k + f_s)`` for ``k`` routed experts of ``f_e`` and a shared expert of ``f_s`` (0 if none); like
  Megatron-LM, the router's ``h E`` and the shared-expert gate are not counted; a MoE model's dense layers
  (Megatron-LM's ``moe_layer_freq`` zeros) count ``3 h f``;
and once: ``h V`` for the logits over the padded vocabulary.

Only the attention term depends on the sequence length. In a packed row each sample attends within
itself, so a sample of ``s_i`` tokens contributes ``s_i x s_i / 2`` scores, not ``s_i x S / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# forward + backward (3 GEMMs per weight: forward, wgrad, dgrad) x 2 FLOPs per multiply-add
_GEMM_FACTOR = 6
_SWIGLU_PROJECTIONS = 3


_MOE_FIELDS = ("moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size", "num_dense_layers")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a GQA + SwiGLU transformer, in Megatron's names; with ``moe_router_topk`` > 0 the MLP
    of every layer but ``num_dense_layers`` of them is routed experts (the dense ones have ``ffn_hidden_size``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # the padded vocabulary (the LM head's rows)
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0  # 0: a dense model
    moe_shared_expert_intermediate_size: int = 0
    num_dense_layers: int = 0  # in a MoE model: the layers with the dense MLP

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            lowest = 0 if name in _MOE_FIELDS else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"ModelShape.{name} must be an integer >= {lowest}, got {value!r}")
        if self.moe_router_topk and not self.moe_ffn_hidden_size:
            raise ValueError("ModelShape.moe_ffn_hidden_size must be positive in a MoE model")
        if self.num_dense_layers and (not self.moe_router_topk or self.num_dense_layers >= self.num_layers):
            raise ValueError("ModelShape.num_dense_layers counts the dense layers among a MoE model's sparse ones")

    @classmethod
    def from_architecture(cls, arch, padded_vocab_size: int) -> "ModelShape":
        """The shape of an architecture in HF names (:class:`~megatron_prm.model.architecture.Architecture`)."""
        moe = {}
        if arch.moe is not None:
            moe = dict(moe_ffn_hidden_size=arch.moe.moe_intermediate_size, moe_router_topk=arch.moe.num_experts_per_tok,
                       moe_shared_expert_intermediate_size=arch.moe.shared_expert_intermediate_size or 0,
                       num_dense_layers=arch.num_hidden_layers - arch.sparse_layer_count)
        return cls(**arch.megatron_shape(), vocab_size=padded_vocab_size, **moe)

    @property
    def active_ffn_size_over_layers(self) -> int:
        """The intermediate sizes a token passes through, summed over the layers: the dense MLP's, or in a
        sparse layer its routed experts' together with the shared expert's."""
        if not self.moe_router_topk:
            return self.num_layers * self.ffn_hidden_size
        sparse = self.moe_ffn_hidden_size * self.moe_router_topk + self.moe_shared_expert_intermediate_size
        return self.num_dense_layers * self.ffn_hidden_size + (self.num_layers - self.num_dense_layers) * sparse


def _per_token_terms(shape: ModelShape, with_logits: bool) -> tuple[float, float]:
    """(FLOPs per token independent of the sequence length, attention FLOPs per token per attended token)."""
    h = shape.hidden_size
    query = shape.kv_channels * shape.num_attention_heads
    key_value = shape.kv_channels * shape.num_query_groups
    projections = h * (query + 2 * key_value) + query * h
    mlp = _SWIGLU_PROJECTIONS * h * shape.active_ffn_size_over_layers
    fixed = _GEMM_FACTOR * (shape.num_layers * projections + mlp)
    if with_logits:
        fixed += _GEMM_FACTOR * h * shape.vocab_size
    # core attention: query x s / 2 (causal) x 2 (QK^T and scores x V) per token of a sequence of s tokens
    attention_per_length = _GEMM_FACTOR * shape.num_layers * query
    return float(fixed), float(attention_per_length)


def training_flops(shape: ModelShape, sample_lengths: Sequence[int], *, with_logits: bool) -> float:
    """Forward+backward FLOPs of one row whose packed samples have these lengths (attention per sample,
    causal counted half, as Megatron-LM's num_floating_point_operations)."""
    if any(length < 0 for length in sample_lengths):
        raise ValueError(f"sample lengths must not be negative, got {list(sample_lengths)}")
    fixed, attention_per_length = _per_token_terms(shape, with_logits)
    tokens = sum(sample_lengths)
    attended = sum(length * length for length in sample_lengths)  # sum over samples of s_i x s_i
    return fixed * tokens + attention_per_length * attended


def flops_per_token(shape: ModelShape, seq_len: int, *, with_logits: bool) -> float:
    """Forward+backward FLOPs per token of unpacked sequences of ``seq_len`` tokens (Megatron-LM's figure
    for ``--seq-length seq_len`` divided by the tokens of a batch)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return training_flops(shape, [seq_len], with_logits=with_logits) / seq_len
