"""SIGTERM / SIGUSR1 / SIGINT (Ctrl-C): save at the next step boundary and stop, instead of dying mid-step.

SLURM sends a signal some time before a job's time limit (``--signal``); a preempting scheduler
sends SIGTERM. The handler only records the signal; every rank checks at the end of each optimizer step,
all together (the signal may reach ranks at different moments, or only some of them), so that all ranks
save the same step and stop. See examples/train_llama3_8b_prm.sh for how the signal reaches torchrun's
workers and how the job requeues itself. A second Ctrl-C stops at once, without saving
(``KeyboardInterrupt``; the CLI turns it into one line and exit status 130).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_recording = False  # a StopSignals is installed in this process


def _ignore_stop_signals_in_child() -> None:
    """A process forked while the training records stop signals (Megatron's checkpoint writer workers, the
    manager process of a save) ignores them: a Ctrl-C in the terminal reaches every process of the group,
    and the parent decides (it finishes the save after a first one, and kills its children after a second
    one); the inherited handler would raise KeyboardInterrupt inside the writer instead."""
    if _recording:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


os.register_at_fork(after_in_child=_ignore_stop_signals_in_child)


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGINT from creation until :meth:`restore`."""

    def __init__(self) -> None:
        global _recording
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        _recording = True

    def _record(self, signum: int, frame) -> None:
        first_ctrl_c = signum == signal.SIGINT and self.received != signal.SIGINT
        if signum == signal.SIGINT and not first_ctrl_c:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        # Recorded before the message: a second Ctrl-C may arrive while it is being printed (Python runs a
        # handler between any two bytecodes, this one's included) and must find the first one recorded.
        self.received = signum
        if first_ctrl_c:
            print("Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again stops at once, without "
                  "saving)", file=sys.stderr, flush=True)

    @property
    def interrupted(self) -> bool:
        """Whether the stop was asked for with Ctrl-C (the CLI then exits with 130, as after SIGINT)."""
        return self.received == signal.SIGINT

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it at every step)."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.received = int(flag.item())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        global _recording
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        _recording = False
