"""Every use of Megatron-Core internals, in one place, for megatron-core 0.16.1 through 0.19.x.

The rest of the package uses Megatron-Core's public API only. Each function here names the private
attribute it reads or replaces and the versions it was checked on (0.16.1 on Python 3.11 and 0.19.2 on
Python 3.12: the two CI legs, ``make test`` and ``make test-py312``). A new Megatron-Core release is
supported once both legs pass on it and the versions below are updated; ``setup.py`` states the range.
Megatron-Core is imported inside the functions, so that :func:`filter_unactionable_warnings` can run before
Megatron-Core's own import-time warnings.

GPTModel or HybridModel: Megatron-Core 0.19 logs "GPTModel IS DEPRECATED" in favour of ``HybridModel``.
The PRM model stays a ``GPTModel`` subclass (:class:`megatron_prm.model.prm_model.PRMGPTModel`):
GPTModel still takes critical fixes and works unchanged on 0.16.1-0.19.x, its parameter names are the
ones the checkpoints and the HF mapping use, and HybridModel exists for hybrid Mamba/attention stacks,
which the supported families (Llama, Mistral, Qwen) are not. GPTModel 0.18+ takes an
``output_processor`` hook in ``forward``; once 0.16/0.17 are dropped, the PRM head belongs there instead of
in a forward of our own (which needs :func:`gpt_preprocess`). The deprecation message is filtered.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from megatron_prm.safe_loading import SafeFileSystemReader, load_plain

# Warnings Megatron-Core (or torch, on Megatron-Core's behalf) emits that a user of this package cannot
# act on: (message regex, matched from the start, no ":" so that pytest.ini's syntax can carry it;
# category; optionally the regex of the module it is attributed to). Checked on 0.16.1 (torch 2.13.0)
# and 0.19.2 (torch 2.14.1).
UNACTIONABLE_WARNINGS: tuple[tuple, ...] = (
    # Import time, wherever Apex / Transformer Engine are absent (always on CPU; TE is optional).
    (r"(Transformer Engine and Apex are|Transformer Engine is|Apex is) not installed", UserWarning),
    # 0.19: importing megatron.core imports the experimental MIMO model config.
    (r"MimoModelConfig is experimental", UserWarning),
    # TransformerConfig's own default cuda_graph_scope "full" (0.16) / cuda_graph_modules (0.19).
    (r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)", UserWarning),
    # torch 2.13+ deprecates the collectives the distributed optimizer calls.
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
    # Import time: Megatron-Core's own modules import its deprecated modules.
    (r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning),
    (r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'\s+module is deprecated",
     DeprecationWarning),
    # torch 2.13's own torch.utils.mkldnn, imported on the way.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    # Megatron-Core's layer specs and parallel layers themselves leave these arguments out.
    (r"MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning),
    (r"Warning\W+tp_group is None, using default tp group", DeprecationWarning),
    # dist_checkpointing.load (0.19): its common-state read calls torch's DCP load without a process group,
    # its torch_dist strategy passes load's arguments by position, and it builds torch ShardedTensors (in
    # CPU mode the FutureWarning is attributed to cpu_mode's torch-function relay).
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load", UserWarning,
     r"torch\.distributed\.checkpoint"),
    (r"The argument order of load has been changed", UserWarning),
    # 0.16's torch_dist strategy calls torch's deprecated DCP load_state_dict.
    (r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead",
     FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # The distributed optimizer's zero_grad reads .grad of its fp32 shard views ("throws grad-access
    # warning", says its own comment); in CPU mode torch attributes it to cpu_mode's torch-function relay.
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
     r"megatron\.core\.optimizer\.optimizer|megatron_prm\.cpu_mode"),
)

# Advice about CUDA that does not apply in CPU mode (added by cpu_mode.enable).
CPU_MODE_WARNINGS: tuple[tuple, ...] = (
    (r"When using (sequence parallelism|async grad allreduce) it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
)

# Log records (logger name, message regex) a user cannot act on.
UNACTIONABLE_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # 0.19+: logged by every GPTModel constructor; see the module docstring for why GPTModel stays.
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED"),
    # 0.19+: dist_checkpointing.save's default async_strategy is "mcore", even for synchronous saves.
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated"),
    # 0.19+: the layout argument that silences it does not exist before 0.19; DDP computes the same layout.
    ("megatron.core.distributed.distributed_data_parallel", r"full_param_layout not provided"),
    # A CUDA build of torch on a machine without CUDA (the Python 3.12 CI leg), when Megatron-Core
    # imports torch.utils.cpp_extension.
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_unactionable_warnings(*, cpu_mode: bool = False) -> None:
    """Silence exactly the warnings listed above, for the rest of the process.

    Call it once at start-up, before Megatron-Core is imported (the command line and the tools do;
    the tests' conftest applies the same lists); CPU mode adds :data:`CPU_MODE_WARNINGS`. Idempotent.
    Warnings from this package are never filtered: they are fixed.
    """
    for message, category, *module in UNACTIONABLE_WARNINGS + (CPU_MODE_WARNINGS if cpu_mode else ()):
        warnings.filterwarnings("ignore", message=message, category=category, module=module[0] if module else "")
    for name, message in UNACTIONABLE_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMessages(message))


# The Megatron-Core modules this package imports; :func:`import_megatron_core` imports them first.
_MEGATRON_MODULES = ("megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
                     "megatron.core.distributed", "megatron.core.dist_checkpointing",
                     "megatron.core.pipeline_parallel")


def import_megatron_core() -> None:
    """Import Megatron-Core with the ``torch.compile`` it applies at import time deferred to first use.

    ``megatron.core.jit.jit_fuser`` is ``torch.compile`` (torch 2.2+), applied as a decorator to the fused
    kernels at import (bias-GeLU, SwiGLU, ...; 0.19 also decorates an MoE router method). torch.compile
    compiles a function only at its first call, but the first decoration imports TorchDynamo and Inductor:
    2.7 s (0.16.1) to 3.6 s (0.19.2) of every process's start-up on a 2-core CPU machine, also in processes
    that never call a fused kernel (``score``, ``plan``, ``reshard``, the converter, CPU training). While these modules are
    imported, each decorated function is wrapped so that torch.compile is applied at its first call, with
    the same options; what runs is then the same compiled function. Call it once at start-up, after
    :func:`filter_unactionable_warnings` (a second call, or a call once Megatron-Core is imported, does
    nothing). Checked on 0.16.1 and 0.19.2.
    """
    if "megatron.core" in sys.modules:
        return
    compile_now = torch.compile
    torch.compile = deferred_compile(compile_now)
    try:
        for name in _MEGATRON_MODULES:
            importlib.import_module(name)
    finally:
        torch.compile = compile_now


def deferred_compile(compile_now: Callable) -> Callable:
    """A stand-in for ``torch.compile`` that applies ``compile_now`` to a function at its first call, with
    the options it was decorated with; modules and other callables are compiled at once."""

    def compile_on_first_call(model=None, **options):
        if model is None:  # @torch.compile(mode=...): the decorator itself
            return lambda function: compile_on_first_call(function, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):  # a function, so that it binds as a method where it decorates one
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_on_first_call


def use_cpu_rng_state(
    get_state: Callable[..., torch.Tensor], set_state: Callable[..., None]
) -> None:
    """CPU mode: make the tensor-parallel RNG tracker save and restore the CPU generator.

    Replaces ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
    (module functions the tracker and activation recompute call). Checked on 0.16.1 and 0.19.2.
    """
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


def gpt_preprocess(model, input_ids, position_ids, packed_seq_params):
    """``GPTModel._preprocess``: the embedding (first stage) or the previous stage's input, and RoPE.

    Returns ``(decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset)``.
    The method returns a 6-tuple (7 with flashinfer's fused RoPE); its first five entries are these.
    Checked on 0.16.1 and 0.19.2.
    """
    return model._preprocess(input_ids=input_ids, position_ids=position_ids, packed_seq_params=packed_seq_params)[:5]


def llama3_scaled_inv_freq(
    rotary, inv_freq: torch.Tensor, *, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """``RotaryEmbedding._apply_scaling``: Llama-3 frequency scaling with explicit factors (the public
    constructor argument hard-codes low 1, high 4 and an original context of 8192). Checked on 0.16.1 and
    0.19.2."""
    return rotary._apply_scaling(
        inv_freq,
        factor=factor,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings,
    )


# ---- The distributed optimizer with PyTorch's own Adam (no Apex, no Transformer Engine) ----
#
# NVIDIA's containers have Apex and TE, and their fused Adam keeps no per-parameter ``step``; PyTorch's
# Adam, Megatron's fallback on CPU and in plain pip installs, does. The distributed optimizer's checkpoint
# loading does not fully account for that:
#
# - building the state dict to load into reads every parameter's ``step``, which a fresh optimizer lacks
#   (``assert len(steps) == 1``) - :func:`prime_adam_state` gives each parameter a zero state first;
# - copying the loaded shards iterates over the destination state, ``step`` included, which the source
#   lacks (``KeyError: 'step'``), and copies into parameters without ``torch.no_grad()`` - the
#   replacement of ``DistributedOptimizer._set_main_param_and_optimizer_states`` skips destination keys
#   the source lacks and ``step`` (dp_reshardable hands back the loading optimizer's own zero step there,
#   which reset every bias correction after a resume: found with issue 21), and copies under ``no_grad``. The ``step`` itself is restored by Megatron from the
#   param groups, as one tensor for all parameters: :func:`untie_adam_steps_after_loading` (below).
#
# Both only act where Megatron uses the PyTorch optimizer. Checked on 0.16.1 and 0.19.2.

_original_set_states = None


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _original_set_states(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key, target in destination.items():
            # ``step`` is restored from the param groups; the dp_reshardable format hands back the loading
            # optimizer's own (primed, zero) step as a non-persistent object, which must not overwrite it.
            if key in tensors and key != "step":
                target.copy_(tensors[key])


def apply() -> None:
    """Install the distributed-optimizer fix above where Megatron uses PyTorch's Adam. Idempotent."""
    global _original_set_states
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if distrib_optimizer.HAVE_APEX_OR_TE or _original_set_states is not None:
        return
    _original_set_states = optimizer_class._set_main_param_and_optimizer_states
    optimizer_class._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    untie_adam_steps_after_loading()


# ---- One Adam ``step`` per parameter after loading (exact stage1 resume) ----
# Checked on megatron-core 0.16.1 (torch 2.13) and 0.19.2 (torch 2.14): without Apex/TE,
# ``DistributedOptimizer.load_state_dict`` restores the step from the param groups as ONE tensor and
# assigns that same object to every parameter's state (``s["step"] = step``); torch's
# ``Optimizer.load_state_dict`` keeps ``step`` as given (no copy unless fused/capturable), and Adam
# increments it in place per parameter (``step_t += 1``, or ``_foreach_add_`` over the list), so
# after a resume every optimizer step advanced the shared counter once per parameter: the bias
# corrections went wrong from the second step after a resume on.

_original_load_state_dict = None


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
    global _original_load_state_dict
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE or _original_load_state_dict is not None:
        return
    _original_load_state_dict = distrib_optimizer.DistributedOptimizer.load_state_dict
    distrib_optimizer.DistributedOptimizer.load_state_dict = _load_state_dict_with_own_steps


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


def _safe_reader(checkpoint_dir, *_args, **_kwargs) -> SafeFileSystemReader:
    return SafeFileSystemReader(checkpoint_dir)


def _safe_common(checkpoint_dir) -> dict:
    from megatron.core.dist_checkpointing.strategies import common as _common_strategies

    path = Path(checkpoint_dir) / _common_strategies.COMMON_STATE_FNAME
    return load_plain(path, str(path))


def _safe_common_method(_self, checkpoint_dir) -> dict:
    return _safe_common(checkpoint_dir)


@contextlib.contextmanager
def _safe_megatron_readers():
    from megatron.core.dist_checkpointing import serialization as _serialization
    from megatron.core.dist_checkpointing.strategies import common as _common_strategies
    from megatron.core.dist_checkpointing.strategies import torch as _torch_strategies

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


def load_dist_checkpoint(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, sharded_strategy=None) -> dict:
    """``dist_checkpointing.load`` (with ``sharded_strategy``, e.g. a fully parallel wrapper of the torch_dist
    one) with every file read through the safe readers."""
    from megatron.core import dist_checkpointing

    with _safe_megatron_readers():
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), sharded_strategy=sharded_strategy)


def local_gradients_finite(model_chunks: list) -> bool:
    """Whether this rank's gradient buffers (Megatron DDP's ``buffers`` / ``expert_parallel_buffers``,
    ``grad_data``; checked on 0.16.1 and 0.19.2) hold only finite numbers.

    One reduction per buffer and no temporary of the buffer's size (``isfinite`` would allocate a
    boolean copy of every gradient): the minimum and maximum are finite exactly when every element is,
    since NaN propagates through both and an infinity becomes one of them."""
    for chunk in model_chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            grads = buffer.grad_data
            if grads is None or grads.numel() == 0:
                continue
            low, high = torch.aminmax(grads)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return False
    return True


def async_save_options() -> dict:
    """Keyword arguments of ``dist_checkpointing.save`` for an asynchronous save that
    :class:`~megatron.core.dist_checkpointing.strategies.async_utils.AsyncCallsQueue` runs.

    0.19 added ``async_strategy`` with the default ``"nvrx"`` (NVIDIA Resiliency Extension, a separate
    package with its own queue); Megatron-Core's own ``"mcore"`` strategy, the only one before 0.19, works
    everywhere (0.19 logs its deprecation, filtered above). Checked on 0.16.1 and 0.19.2."""
    import inspect

    from megatron.core import dist_checkpointing

    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


# ---- Megatron-Core's MoE layer without Transformer Engine, and on the CPU ----
# 1. megatron-core 0.16.1 imports ``te_general_gemm`` and the fused MoE kernels into
#    ``megatron.core.transformer.moe.moe_utils`` only when Transformer Engine imports, but the router's
#    ``RouterGatingLinearFunction`` tests ``te_general_gemm is not None`` unconditionally: without TE every
#    MoE forward fails with a NameError. Defining the missing names as None selects Megatron's own torch
#    path (the fused kernels are used only under options that require TE).
# 2. The all-to-all token dispatcher turns its split sizes into numpy arrays in
#    ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, but only for CUDA tensors; split sizes computed on
#    the CPU stay tensors, which ``all_to_all_single`` refuses. CPU tensors are converted the same way
#    (a CUDA tensor takes Megatron's own path unchanged).
# Checked on 0.16.1 and 0.19.2.
_MOE_TE_NAMES = ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute")


def prepare_moe() -> None:
    """Make Megatron-Core's MoE layer run without TE and with CPU tensors (see above). Idempotent."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not moe_utils.HAVE_TE:
        for name in _MOE_TE_NAMES:
            if not hasattr(moe_utils, name):
                setattr(moe_utils, name, None)
    original = token_dispatcher.maybe_move_tensor_to_cpu
    if getattr(original, "converts_cpu_tensors", False):
        return

    @functools.wraps(original)
    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    move_to_cpu.converts_cpu_tensors = True
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def moe_auxiliary_losses(num_microbatches: int) -> dict[str, float]:
    """The MoE routers' auxiliary losses of the step just run, summed over the layers and averaged over
    the micro batches and data-parallel ranks, by Megatron's name (``load_balancing_loss``, ``z_loss``;
    without their coefficients), as Megatron-LM's ``track_moe_metrics`` reduces them; the tracker is then
    cleared. A collective over the pipeline and data-parallel ranks: every rank calls it after every
    step. Reads ``moe_utils``' layer-wise logging tracker (a module global). Checked on 0.16.1 and 0.19.2."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names = sorted(tracker)
    if not names:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks(names)
    losses = {name: tracker[name]["values"].sum().item() / num_microbatches for name in names}
    moe_utils.clear_aux_losses_tracker()
    return losses


def observe_router_logits(module: torch.nn.Module, hook: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Pass the router logits of every MoE layer in ``module`` through ``hook`` (which returns them, possibly
    with autograd nodes attached) before the router routes them; returns how many routers were found.
    ``TopKRouter.forward`` computes ``logits = self.gating(input)`` and routes them: an instance attribute
    ``gating`` wrapping the bound method takes its place. The logits are ``[s, b, num_experts]`` (``[s/TP, b,
    E]`` under sequence parallelism). Checked on 0.16.1 and 0.19.2."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in module.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        def gating(input: torch.Tensor, _original=router.gating) -> torch.Tensor:
            return hook(_original(input))

        router.gating = gating
    return len(routers)


def moe_aux_loss_backward_scale(device: torch.device) -> torch.Tensor:
    """The factor the pipeline schedule set for the MoE auxiliary losses' gradients of the current micro batch
    (``MoEAuxLossAutoScaler.main_loss_backward_scale``: the fp16 loss scale under ``calculate_per_token_loss``,
    1 without a grad scaler; None before the first schedule call). Checked on 0.16.1 and 0.19.2."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    return torch.ones((), device=device) if scale is None else scale.reshape(())
