"""A spawned rank of tests/test_data_scale.py: what each rank gets of global rank 0's data work, which
first succeeds, then fails."""

import os

import torch.distributed as dist

from megatron_prm.data.one_rank import on_rank_zero
from megatron_prm.data.records import RecordError


def fail_on_rank_zero(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    decided = on_rank_zero(lambda: f"decided on rank {dist.get_rank()}")
    worked = []

    def work():
        worked.append(rank)
        raise RecordError("data.jsonl", 3, "labels", "is missing", 4)

    try:
        on_rank_zero(work)
    except RecordError as err:
        results.put((rank, decided, worked, str(err)))
    dist.destroy_process_group()
