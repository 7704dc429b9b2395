"""Cross-entropy over the two reward tokens at every labelled placeholder.

The target of a step is ``[p, 1 - p]`` over (good, bad) with ``p`` = P(good): 1 or 0 for hard
labels, the float itself for soft labels. The loss function returns the *sum* over the microbatch's
labelled steps and their count; with ``calculate_per_token_loss`` Megatron-Core adds up the counts over
microbatches and data-parallel ranks and divides the gradients by the total, so the optimised loss is
the exact mean over every labelled step of the global batch, and a microbatch without labelled steps
contributes 0 (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def step_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step loss ``-(p log P(good) + (1 - p) log P(bad))``; logits ``[n, 2]``, targets ``[n]``."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = targets.float()
    return -(targets * log_probs[:, 0] + (1.0 - targets) * log_probs[:, 1])


def prm_loss(
    targets: torch.Tensor, logits: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss function: ``(loss sum, labelled-step count, report)``.

    The report's ``"prm"`` entry holds ``[loss sum, count, correct count]`` (detached), the figures a
    training log needs; a step counts as correct when ``P(good) >= threshold`` agrees with
    ``target >= 0.5``.
    """
    losses = step_losses(logits, targets)
    loss_sum = losses.sum()
    count = torch.tensor(targets.numel(), dtype=torch.int, device=logits.device)
    with torch.no_grad():
        p_good = torch.softmax(logits.float(), dim=-1)[:, 0]
        correct = ((p_good >= threshold) == (targets >= 0.5)).sum()
        report = {"prm": torch.stack([loss_sum.detach(), count.float(), correct.float()])}
    return loss_sum, count, report
