"""The PRM head under tensor parallelism 2 against one process; tests/test_head_and_loss.py runs it.

``torchrun --nproc-per-node 2 tests/tp_reward_head.py`` (CPU, gloo): the same hidden states, LM-head
weight and labelled positions on both ranks; each rank holds its half of the vocabulary rows (and,
under sequence parallelism, its half of the positions). Logits, the loss and the gradients of the hidden
states and of the weight must equal the single-process computation, and every collective the head runs
(forward and backward) is recorded: none may carry more than the ``[n, h]`` selected rows.
"""

import json
import sys

import torch
import torch.distributed as dist

from megatron_prm.layout import ParallelLayout
from megatron_prm.runtime import init_runtime, shutdown

SEQ, BATCH, HIDDEN, VOCAB = 16, 2, 8, 32
REWARD_IDS = (3, 20)  # on rank 0 and rank 1 of the 2-way vocabulary split
REWARD_INDEX = [(0, 1), (1, 4), (0, 7), (1, 8), (0, 12), (1, 15)]  # (batch row, position), both halves
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
               "_reduce_scatter_base", "broadcast")


class CollectiveRecorder:
    """Wraps torch.distributed's collectives and records the shape of every tensor they move."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self._originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def __enter__(self) -> "CollectiveRecorder":
        for name, original in self._originals.items():
            setattr(dist, name, self._recording(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _recording(self, name, original):
        def call(tensor, *args, **kwargs):
            self.calls.append((name, list(tensor.shape)))
            return original(tensor, *args, **kwargs)

        return call


def reference(hidden, weight, reward_index, reward_ids, coefficients):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    logits = hidden[reward_index[:, 1], reward_index[:, 0]] @ weight[reward_ids].t()
    (logits * coefficients).sum().backward()
    return logits.detach(), hidden.grad, weight.grad


def sharded(hidden, weight, reward_index, reward_ids, coefficients, sequence_parallel, group):
    from megatron_prm.model.reward_head import reward_logits

    rank, size = group.rank(), group.size()
    rows = VOCAB // size
    weight_shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    if sequence_parallel:
        local = SEQ // size
        hidden = hidden[rank * local:(rank + 1) * local]
    hidden = hidden.clone().requires_grad_()
    with CollectiveRecorder() as forward:
        logits = reward_logits(hidden, reward_index, weight_shard, reward_ids, group, sequence_parallel)
    with CollectiveRecorder() as backward:
        (logits * coefficients).sum().backward()
    return logits.detach(), hidden.grad, weight_shard.grad, forward.calls, backward.calls


def main(out: str) -> None:
    from megatron.core import parallel_state

    init_runtime("cpu", 0, ParallelLayout(tensor_parallel_size=2))
    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    coefficients = torch.randn(len(REWARD_INDEX), 2, generator=generator)
    reward_index = torch.tensor(REWARD_INDEX)
    reward_ids = torch.tensor(REWARD_IDS)
    expected_logits, expected_hidden_grad, expected_weight_grad = reference(
        hidden, weight, reward_index, reward_ids, coefficients)
    report = {}
    for sequence_parallel in (False, True):
        logits, hidden_grad, weight_grad, forward, backward = sharded(
            hidden, weight, reward_index, reward_ids, coefficients, sequence_parallel, group)
        rows, local = VOCAB // 2, SEQ // 2
        expected_hidden = expected_hidden_grad[rank * local:(rank + 1) * local] if sequence_parallel else expected_hidden_grad
        report["sp" if sequence_parallel else "tp"] = {
            "logits_error": (logits - expected_logits).abs().max().item(),
            "hidden_grad_error": (hidden_grad - expected_hidden).abs().max().item(),
            "weight_grad_error": (weight_grad - expected_weight_grad[rank * rows:(rank + 1) * rows]).abs().max().item(),
            "weight_grad_rows": sorted(set(weight_grad.abs().sum(1).nonzero().flatten().tolist())),
            "forward_collectives": forward,
            "backward_collectives": backward,
        }
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
