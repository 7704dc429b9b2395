"""The budget of optimizer steps skipped for a non-finite loss or gradient (max_skipped_nonfinite_steps).

Megatron-LM's ``--check-for-nan-in-loss-and-grad`` stops at the first NaN; here a run may skip a few such
steps (no update is applied) before it stops. A stop happens before the step's checkpoint is written, so
nothing non-finite ever reaches a checkpoint or ``latest``. The count is saved with each checkpoint, so
the budget covers the whole run, not each launch of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients more often than the budget allows."""


@dataclass
class NonFiniteBudget:
    """Counts skipped steps; raises :class:`NonFiniteError` once there are more than ``limit``."""

    limit: int
    skipped: int = 0

    def record(self, step: int, loss: Optional[float]) -> None:
        self.skipped += 1
        if self.skipped > self.limit:
            what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else "a non-finite gradient"
            raise NonFiniteError(
                f"step {step}: {what}; {self.skipped} non-finite step(s) exceed max_skipped_nonfinite_steps "
                f"{self.limit}. The run stops without saving this step (lower learning_rate, check the data, or "
                "raise max_skipped_nonfinite_steps)")
