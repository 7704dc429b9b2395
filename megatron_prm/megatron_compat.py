"""Work-arounds for Megatron-Core 0.16 with PyTorch's own Adam (no Apex, no Transformer Engine).

NVIDIA's containers have Apex and TE, and their fused Adam keeps no per-parameter ``step``; PyTorch's
Adam, Megatron's fallback on CPU and in plain pip installs, does. The distributed optimizer's checkpoint
loading does not fully account for that:

- building the state dict to load into reads every parameter's ``step``, which a fresh optimizer lacks
  (``assert len(steps) == 1``) - :func:`prime_adam_state` gives each parameter a zero state first;
- copying the loaded shards iterates over the destination state, ``step`` included, which the source
  lacks (``KeyError: 'step'``), and copies into parameters without ``torch.no_grad()`` - the
  replacement of ``_set_main_param_and_optimizer_states`` skips destination keys the source lacks
  and copies under ``no_grad``. The ``step`` itself is restored by Megatron from the param groups;
- ...as one tensor shared by every parameter, which Adam then advances once per parameter and step -
  :func:`untie_adam_steps` gives each parameter its own copy after loading (exact stage1 resume).

All three only act where Megatron uses the PyTorch optimizer.
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
    untie_adam_steps_after_loading()


# ------------------------------------------------------------------ one Adam ``step`` per parameter
# Checked on megatron-core 0.16.1 (torch 2.13) and 0.19.2 (torch 2.14): without Apex/TE,
# ``DistributedOptimizer.load_state_dict`` restores the step from the param groups as ONE tensor and
# assigns that same object to every parameter's state (``s["step"] = step``); torch's
# ``Optimizer.load_state_dict`` keeps ``step`` as given (no copy unless fused/capturable), and Adam
# increments it in place per parameter (``step_t += 1``, or ``_foreach_add_`` over the list), so
# after a resume every optimizer step advanced the shared counter once per parameter: the bias
# corrections went wrong from the second step after a resume on.

_original_load_state_dict = DistributedOptimizer.load_state_dict


def untie_adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter of a PyTorch optimizer a ``step`` tensor of its own where several share
    one; returns how many were replaced."""
    seen: set[int] = set()
    replaced = 0
    for slot in optimizer.state.values():
        step = slot.get("step")
        if not isinstance(step, torch.Tensor):
            continue
        if id(step) in seen:
            slot["step"] = step.detach().clone()
            replaced += 1
        seen.add(id(slot["step"]))
    return replaced


def _load_state_dict_with_own_steps(self, state_dict):
    _original_load_state_dict(self, state_dict)
    untie_adam_steps(self.optimizer)


def untie_adam_steps_after_loading() -> None:
    """Install the fix (idempotent); only where Megatron uses PyTorch's Adam (no Apex/TE)."""
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        DistributedOptimizer.load_state_dict = _load_state_dict_with_own_steps


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


# ------------------------------------------------------------------------------------------------------
# Safe checkpoint loading (issue 14). Megatron-Core's ``dist_checkpointing.load`` builds its own DCP
# readers (``strategies.torch._get_filesystem_reader``: torch's FileSystemReader, which unpickles
# ``.metadata`` and byte items) and reads ``common.pt`` with a bare ``torch.load`` (whose default a
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment turns unsafe). :func:`load_dist_checkpoint` swaps in the
# project's safe reader and a weights_only common load for the duration of one load.
# Checked on megatron-core 0.16.1 (common.pt via TorchCommonLoadStrategy.load_common) and 0.19.2 (common
# state as a byte item read through serialization._get_filesystem_reader, or a legacy common.pt through
# serialization.load_common).
# ------------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing import serialization as _serialization  # noqa: E402
from megatron.core.dist_checkpointing.strategies import common as _common_strategies  # noqa: E402
from megatron.core.dist_checkpointing.strategies import torch as _torch_strategies  # noqa: E402

from megatron_prm.safe_loading import SafeFileSystemReader, load_plain  # noqa: E402


def _safe_reader(checkpoint_dir, *_args, **_kwargs) -> SafeFileSystemReader:
    return SafeFileSystemReader(checkpoint_dir)


def _safe_common(checkpoint_dir) -> dict:
    path = Path(checkpoint_dir) / _common_strategies.COMMON_STATE_FNAME
    return load_plain(path, str(path))


def _safe_common_method(_self, checkpoint_dir) -> dict:
    return _safe_common(checkpoint_dir)


@contextlib.contextmanager
def _safe_megatron_readers():
    replacements = [(_torch_strategies, "_get_filesystem_reader", _safe_reader),
                    (_serialization, "_get_filesystem_reader", _safe_reader),
                    (_serialization, "load_common", _safe_common)]
    common_class = getattr(_common_strategies, "TorchCommonLoadStrategy", None)
    if common_class is not None:
        replacements.append((common_class, "load_common", _safe_common_method))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements if hasattr(owner, name)]
    try:
        for owner, name, replacement in replacements:
            if hasattr(owner, name):
                setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def load_dist_checkpoint(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike) -> dict:
    """``dist_checkpointing.load`` with every file read through the safe readers."""
    with _safe_megatron_readers():
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir))


def local_gradients_finite(model_chunks: list) -> bool:
    """Whether this rank's gradient buffers (Megatron DDP's ``buffers`` / ``expert_parallel_buffers``,
    ``grad_data``; checked on 0.16.1 and 0.19.2) hold only finite numbers."""
    for chunk in model_chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if buffer.grad_data is not None and not bool(torch.isfinite(buffer.grad_data).all()):
                return False
    return True
