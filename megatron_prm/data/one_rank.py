"""Data work that one process does for the whole job while the others wait (tokenizing, packing plans).

The others wait in a broadcast on a gloo group of their own with a long timeout: tokenizing a large set
may take longer than the default process group's timeout (30 minutes, set in runtime.py). An
error on the working rank is raised on every rank, as the same exception, so each prints the one message;
its result (a path) reaches every rank too, so all ranks use what rank 0 decided.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")
_WAIT = datetime.timedelta(hours=24)
_waiting: Optional[tuple[object, object]] = None  # (the default process group, its waiting group)


def _waiting_group():
    global _waiting
    if _waiting is None or _waiting[0] is not dist.group.WORLD:  # a process may start several in turn
        _waiting = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=_WAIT))  # collective: all ranks
    return _waiting[1]


def on_rank_zero(work: Callable[[], T]) -> T:
    """Run ``work`` on global rank 0 (or in this process when it is alone) and return its result on every
    rank: the other ranks wait for it, and raise the exception it raised."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    group = _waiting_group()
    outcome: list = [None, None]  # (result, exception)
    if dist.get_rank() == 0:
        try:
            outcome[0] = work()
        except Exception as err:
            outcome[1] = err if _travels(err) else RuntimeError(f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(outcome, src=0, group=group)
            raise
    dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _travels(err: BaseException) -> bool:
    """Whether the exception survives the trip to the other ranks as itself."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return False
    return True
