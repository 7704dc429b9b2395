"""Forward-only evaluation over a held-out set, with metrics exact across data-parallel ranks."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prm.data.batching import Collator, without_labels
from megatron_prm.data.pipeline import Packing, SampleSource, eval_plan
from megatron_prm.forward_step import eval_forward_step, run_schedule
from megatron_prm.metrics import StepPredictions, prm_metrics
from megatron_prm.progress import progress

# Micro batches per forward-only schedule without pipeline parallelism (any number works; a few at a
# time let the progress bar move).
_UNPIPELINED_GROUP = 16


def _to_predictions(reports: list[dict]) -> tuple[StepPredictions, float]:
    parts, loss_sum = [], 0.0
    for report in reports:
        loss_sum += float(report["loss_sum"])
        parts.append(
            StepPredictions(
                p_good=report["p_good"].cpu().numpy(),
                targets=report["targets"].cpu().numpy(),
                record_ids=report["record_ids"].cpu().numpy(),
                step_ids=report["step_ids"].cpu().numpy(),
            )
        )
    return StepPredictions.concatenate(parts), loss_sum


def predict(
    model: list, samples: SampleSource, micro_batch_size: int, collator: Collator, device: torch.device,
    packing: Optional[Packing] = None, show_progress: bool = False, gather: bool = True,
) -> tuple[StepPredictions, float] | None:
    """Every sample's step predictions and the summed loss, gathered from all data (and context) parallel
    ranks onto the logging rank (with ``gather`` false: this rank's share only, as its microbatches give
    them).

    Micro batches are length-sorted and run in groups, one forward-only schedule each; with pipeline
    parallelism a group holds similar lengths padded to one shape (the interleaved schedule also
    gets label-free micro batches up to a multiple of the pipeline size). Returns None on ranks that
    are not on the last pipeline stage (they hold no predictions), and when gathering, on every rank but
    the logging rank.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    plan = eval_plan(samples, micro_batch_size, packing, dp_rank, dp_size)
    group = _UNPIPELINED_GROUP if pp == 1 else 4 * pp
    for chunk in model:
        chunk.eval()
    reports: list[dict] = []
    with torch.no_grad(), progress(desc="evaluating", total=len(plan), unit="batches", enabled=show_progress) as bar:
        for start in range(0, len(plan), group):
            batches = collator([[samples[i] for i in indices] for indices in plan[start:start + group]])
            if len(model) > 1:
                batches += [without_labels(batches[0])] * (-len(batches) % pp)
            reports += run_schedule(model, eval_forward_step(device), batches, forward_only=True)
            bar.update(len(plan[start:start + group]))
    for chunk in model:
        chunk.train()
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = _to_predictions(reports)
    if not gather:
        return local
    # Under context parallelism each rank predicts the labelled steps in its chunks: gather those too.
    return gather_to_logging_rank(local, parallel_state.get_data_parallel_group(with_context_parallel=True))


def gather_to_logging_rank(
    local: tuple[StepPredictions, float], group: dist.ProcessGroup,
) -> tuple[StepPredictions, float] | None:
    """The data-parallel ranks' predictions and loss sums joined on the logging rank (the last global rank,
    where metrics are computed and logged); None on every other rank.

    Metrics such as AUROC and ECE need every (P(good), target) pair in one place, but only one place:
    gathering to every rank would hold the whole dev set's predictions on each of them. Only the
    data-parallel group that holds the logging rank takes part (the other tensor-parallel ranks' groups
    hold the same predictions again).
    """
    logging_rank = dist.get_world_size() - 1
    members = dist.get_process_group_ranks(group)
    if logging_rank not in members:
        return None
    gathered: list | None = [None] * len(members) if dist.get_rank() == logging_rank else None
    dist.gather_object(local, gathered, dst=logging_rank, group=group)
    if gathered is None:
        return None
    return StepPredictions.concatenate([part[0] for part in gathered]), sum(part[1] for part in gathered)


def evaluate(
    model: list,
    samples: SampleSource,
    micro_batch_size: int,
    collator: Collator,
    device: torch.device,
    threshold: float,
    process_reward: bool,
    packing: Optional[Packing] = None,
    show_progress: bool = False,
) -> dict | None:
    """Loss and PRM metrics over ``samples`` on the logging rank; None on every other rank."""
    result = predict(model, samples, micro_batch_size, collator, device, packing, show_progress)
    if result is None:
        return None
    predictions, loss_sum = result
    metrics = prm_metrics(predictions, threshold, process_reward)
    metrics["loss"] = loss_sum / max(len(predictions.p_good), 1)
    return metrics


def labelled_steps(source: SampleSource) -> StepPredictions:
    """The targets of every labelled step of ``source`` (P(good) left at 0, to be filled by a predictor)."""
    samples = [source[i] for i in range(len(source))]
    targets = [s.label_values for s in samples]
    return StepPredictions(
        p_good=np.zeros(sum(t.size for t in targets)),
        targets=np.concatenate(targets) if targets else np.zeros(0),
        record_ids=np.concatenate([np.full(s.label_values.size, s.record_index) for s in samples]) if samples else np.zeros(0),
        step_ids=np.concatenate([s.step_ids for s in samples]) if samples else np.zeros(0),
    )
