"""``recompute_granularity: full_attn``: recompute the whole attention block in the backward pass.

Megatron-Core's selective recompute covers the attention core (``core_attn``: softmax(QK)V) but not
the projections around it; the recipe's ``full_attn`` also recomputes the QKV and output projections,
saving their activations too. This SelfAttention runs its forward under Megatron's activation
checkpoint (which restores the RNG tracker states when it recomputes).
"""

from __future__ import annotations

from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention


class RecomputedSelfAttention(SelfAttention):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if not self.training:
            return super().forward(hidden_states, attention_mask, **kwargs)

        def attention(hidden, mask):
            return SelfAttention.forward(self, hidden, mask, **kwargs)

        return tensor_parallel.checkpoint(attention, False, hidden_states, attention_mask)
