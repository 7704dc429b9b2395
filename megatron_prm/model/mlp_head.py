"""Qwen2.5-Math-PRM's classifier head: ``Linear(h, h)``, ReLU, ``Linear(h, 2)`` on the final hidden
states at the labelled positions (``reward_head: mlp``).

Replicated on every tensor-parallel rank (h^2 + 3h + 2 parameters: 12.9 M for a 7B model, 67 M for
72B). Every rank holds the whole decoder output at the labelled positions (gathered first under
sequence parallelism), so every rank computes the same logits and the same head gradients; no
collective runs on the head's parameters, and Megatron counts them once in the gradient norm (they
carry no ``tensor_model_parallel`` attribute). The gradient with respect to the hidden states is
likewise complete on every rank and must not be summed over the tensor-parallel group: without
sequence parallelism it passes back unchanged, as the decoder's replicated output expects; with it,
the gather's backward splits instead of reduce-scattering (``tensor_parallel_output_grad=False``).

Module names ``hidden`` / ``output`` map to the published ``score.0`` / ``score.2``. The published
classes are ordered (bad, good) (Qwen2.5-Math-PRM reads P(good) from column 1); the head returns
(good, bad) like the LM-head path, so the loss and the scorer are shared.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig


def mlp_head_parameters(hidden_size: int) -> int:
    """Parameters of the head: ``Linear(h, h)`` and ``Linear(h, 2)``, with biases."""
    return hidden_size * hidden_size + hidden_size + 2 * hidden_size + 2


class MLPRewardHead(torch.nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.hidden = torch.nn.Linear(h, h, dtype=config.params_dtype)
        self.output = torch.nn.Linear(h, 2, dtype=config.params_dtype)
        # The same values on every tensor-parallel rank, whatever random numbers each rank drew before.
        generator = torch.Generator().manual_seed(torch.initial_seed())
        for layer in (self.hidden, self.output):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * config.init_method_std)
                layer.bias.zero_()

    def forward(self, hidden_states: torch.Tensor, reward_index: torch.Tensor, tp_group: torch.distributed.ProcessGroup,
                sequence_parallel: bool) -> torch.Tensor:
        """Logits ``[n, 2]`` (good, bad), in float32, at the ``reward_index`` rows of (batch row, position).

        hidden_states: decoder output ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism).
        """
        if sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=tp_group)
        selected = hidden_states[reward_index[:, 1], reward_index[:, 0]]
        bad_good = self.output(torch.relu(self.hidden(selected)))
        return bad_good.float().flip(-1)
