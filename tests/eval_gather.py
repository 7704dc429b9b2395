"""A spawned rank of tests/test_distributed.py: what each of three ranks gets from gather_to_logging_rank
when ranks 1 and 2 form one data-parallel group and rank 0 another (as a tensor-parallel rank's group)."""

import os

import numpy as np
import torch.distributed as dist

from megatron_prm.evaluation import gather_to_logging_rank
from megatron_prm.metrics import StepPredictions


def gather_on_rank(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    groups = {0: dist.new_group([0]), 1: dist.new_group([1, 2])}  # every rank creates every group
    group = groups[0] if rank == 0 else groups[1]
    local = StepPredictions(p_good=np.full(rank + 1, rank / 10), targets=np.full(rank + 1, 1.0),
                            record_ids=np.full(rank + 1, rank), step_ids=np.arange(rank + 1))
    gathered = gather_to_logging_rank((local, float(rank)), group)
    results.put((rank, None if gathered is None else (gathered[0].record_ids.tolist(), gathered[1])))
    dist.destroy_process_group()
