"""Process-level set-up: device, process group, Megatron parallel state and seeds."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_prm import cpu_mode
from megatron_prm.config import ConfigError
from megatron_prm.layout import ParallelLayout


@dataclass(frozen=True)
class Runtime:
    """What the rest of the program needs to know about this process."""

    device: torch.device
    rank: int
    world_size: int
    data_parallel_rank: int
    data_parallel_size: int
    is_last_stage: bool
    use_transformer_engine: bool

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: on the last pipeline stage, where losses and metrics exist (Megatron's print_rank_last)."""
        return self.rank == self.world_size - 1


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but no CUDA GPU is visible (use device auto or cpu)")
    return requested


def transformer_engine_available() -> bool:
    """Transformer Engine is optional: present in NVIDIA's containers, absent on CPU machines."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install counts as none
        return False
    return True


def seed_everything(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_runtime(device: str, seed: int, layout: ParallelLayout = ParallelLayout()) -> Runtime:
    """Initialise torch.distributed (torchrun's environment, or a one-process group) and Megatron.

    In CPU mode CUDA calls are redirected first (see :mod:`megatron_prm.cpu_mode`) and gloo is
    the backend; on GPUs NCCL is used and each process binds to its LOCAL_RANK device.
    """
    from megatron.core import parallel_state

    kind = resolve_device(device)
    if kind == "cpu":
        cpu_mode.enable()
        torch_device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)

    if not dist.is_initialized():
        backend = "gloo" if kind == "cpu" else "nccl"
        timeout = datetime.timedelta(minutes=30)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_parallel_size
        if layout.virtual_pipeline_parallel_size > 1 else None,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_size,
    )
    if parallel_state.get_data_parallel_world_size() != layout.data_parallel_size:
        raise RuntimeError(
            f"{dist.get_world_size()} processes do not make the data-parallel size {layout.data_parallel_size} "
            "the layout was resolved for"
        )
    seed_everything(seed)
    return Runtime(
        device=torch_device,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=kind == "cuda" and transformer_engine_available(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
