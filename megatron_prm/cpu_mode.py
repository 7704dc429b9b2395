"""Run Megatron-Core on a machine without a GPU.

Megatron-Core has no CPU mode: its schedules, DDP buffers, RNG tracker and rotary embedding call
``torch.cuda.*`` or allocate on ``device="cuda"``. :func:`enable` redirects those calls to the CPU so
that the same training code runs on 1-4 gloo processes for tests and small demos. It is switched on by
the launcher only where no GPU is present (``device="auto"``) or when asked for (``device="cpu"``);
it refuses to run where CUDA is available, so it can never silently move a GPU job onto the CPU.

Measured on megatron-core 0.16.1 with torch 2.13.0 (CPU build) and 0.19.2 with torch 2.14.1: GPTModel
forward/backward, tensor and pipeline parallelism, DDP and the distributed optimizer all run once these
calls are redirected. Only ``torch.*`` is patched here; the Megatron-Core internals that CPU mode needs
replaced are in :mod:`megatron_prm.megatron_compat`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

from megatron_prm import megatron_compat

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int names a CUDA ordinal for ``device=`` arguments.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(value):
    return torch.device("cpu") if _is_cuda(value) else value


class _CudaToCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The distributed optimizer checks for "torch.cuda.FloatTensor" and friends.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            # Pinned host memory needs a CUDA allocator; Megatron-Core pins the indices it copies to the GPU
            # (the context-parallel RoPE slice, for one).
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function again.
    torch.default_generator.manual_seed(seed)


class CpuStream:
    """Stand-in for ``torch.cuda.Stream``: on the CPU every operation runs in order, so waiting is a no-op.

    Megatron-Core 0.19 calls ``torch.cuda.current_stream().wait_event(...)`` in the DDP gradient sync
    (``_ParamAndGradBucketGroup.start_grad_sync``) whether or not CUDA graphs are in use.
    """

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def wait_event(self, event=None) -> None:
        pass

    def wait_stream(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record_event(self, event=None) -> "CpuEvent":
        return event if event is not None else CpuEvent()


class CpuEvent:
    """Stand-in for ``torch.cuda.Event``: always complete."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = CpuStream()


def _in_backward_too(method):
    """Run a custom autograd Function's backward under the redirection as well.

    The autograd engine does not carry torch-function modes into ``backward``, and Megatron's
    activation recompute re-runs forward code there (e.g. ``get_default_causal_mask`` allocates on
    ``device="cuda"``).
    """

    @functools.wraps(method)
    def wrapped(self, *args):
        with _CudaToCpu():
            return method(self, *args)

    return wrapped


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Redirect CUDA calls of torch and Megatron-Core to the CPU for the rest of the process.

    Must run before Megatron-Core modules are used (importing them first is fine: the patched
    functions are looked up at call time). Idempotent.
    """
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU mode was requested on a machine with a CUDA GPU; run with device=cuda instead."
        )
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.device_count = lambda: 0
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed already seeded the CPU
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    cuda.current_stream = lambda *a, **k: _CPU_STREAM
    cuda.default_stream = lambda *a, **k: _CPU_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Stream = CpuStream
    cuda.Event = CpuEvent

    megatron_compat.use_cpu_rng_state(_cpu_rng_state, _set_cpu_rng_state)
    megatron_compat.filter_unactionable_warnings(cpu_mode=True)

    from torch.autograd.function import BackwardCFunction

    BackwardCFunction.apply = _in_backward_too(BackwardCFunction.apply)
    BackwardCFunction.apply_boxed = _in_backward_too(BackwardCFunction.apply_boxed)

    _CudaToCpu().__enter__()  # entered for the life of the process, never exited
    _enabled = True

