"""Work-arounds for Megatron-Core 0.16 with PyTorch's own Adam (no Apex, no Transformer Engine).

NVIDIA's containers have Apex and TE, and their fused Adam keeps no per-parameter ``step``; PyTorch's
Adam, Megatron's fallback on CPU and in plain pip installs, does. The distributed optimizer's checkpoint
loading does not fully account for that:

- building the state dict to load into reads every parameter's ``step``, which a fresh optimizer lacks
  (``assert len(steps) == 1``) - :func:`prime_adam_state` gives each parameter a zero state first;
- copying the loaded shards iterates over the destination state, ``step`` included, which the source
  lacks (``KeyError: 'step'``), and copies into parameters without ``torch.no_grad()`` - the
  replacement of ``_set_main_param_and_optimizer_states`` skips destination keys the source lacks
  and copies under ``no_grad``. The ``step`` itself is restored by Megatron from the param groups.

Both only act where Megatron uses the PyTorch optimizer.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _original_set_states(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key, target in destination.items():
            if key in tensors:
                target.copy_(tensors[key])


def apply() -> None:
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def prime_adam_state(optimizer) -> None:
    """Give every parameter of a PyTorch Adam a zero state, ``step`` included, before a checkpoint is
    loaded into it (the loaded values replace it)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        if not isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                slot = torch_optimizer.state[param]
                if "step" not in slot:
                    slot["step"] = torch.tensor(0.0)
                    slot["exp_avg"] = torch.zeros_like(param.data)
                    slot["exp_avg_sq"] = torch.zeros_like(param.data)
