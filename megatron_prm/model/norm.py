"""RMSNorm for Megatron-Core's local layer spec that also works with sequence parallelism.

Megatron's torch-norm fallback refuses sequence parallelism: under it each tensor-parallel rank
normalises a different slice of the sequence, so the norm weight's gradient is partial on every rank
and must be summed over the tensor-parallel group. Megatron's ``finalize_model_grads`` does that for
every parameter carrying ``sequence_parallel = True``; this norm sets the attribute. The arithmetic
follows Hugging Face's LlamaRMSNorm (statistics in fp32); the output is in the parameters' dtype, so
that with an fp32 residual stream (fp16 O1) the following layer still receives fp16 inputs.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(self.weight.dtype)
