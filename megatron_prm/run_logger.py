"""Training log: one readable line per event on stdout, one JSON object per event in ``log.jsonl``, and
the experiment trackers of ``report_to`` (TensorBoard, Weights & Biases).

A tracker run belongs to the run directory: its id is kept in ``output_dir/trackers.json``, so a resumed
or requeued run continues the same W&B run, and TensorBoard appends to the same event directory.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any, Optional

from megatron_prm import optional, strict_json
from megatron_prm.config import RunConfig

TRACKERS_FILE = "trackers.json"


def import_tracker(tracker: str, config: RunConfig):
    """The tracker's module, or one MissingDependency that names the package and how to get it."""
    feature = "tensorboard_dir" if tracker == "tensorboard" and config.training.tensorboard_dir else f"report_to {tracker}"
    return optional.require(tracker, feature)


def check_trackers(config: RunConfig) -> None:
    """Fail before anything starts (on every rank alike) when a tracker's package is missing."""
    for tracker in config.training.trackers:
        import_tracker(tracker, config)


class _WandbTracker:
    def __init__(self, config: RunConfig, output_dir: Path) -> None:
        wandb = import_tracker("wandb", config)
        ids_path = output_dir / TRACKERS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        run_id = ids.get("wandb_run_id") or secrets.token_hex(4)  # wandb ids: up to 128 of [a-z0-9_-]
        self._run = wandb.init(
            id=run_id, resume="allow", name=config.training.run_name or output_dir.resolve().name,
            config=config.to_flat_dict(), dir=str(output_dir),
        )
        # Our step is a logged value, not wandb's internal step: a resumed run re-logs steps after its
        # last checkpoint, which wandb would drop as out of order.
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        if ids.get("wandb_run_id") != run_id:
            ids_path.write_text(json.dumps({**ids, "wandb_run_id": run_id}) + "\n")

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        self._run.log({"step": step, **{f"{kind}/{name}": value for name, value in values.items()}})

    def close(self) -> None:
        self._run.finish()


class _TensorBoardTracker:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._writer.close()


class RunLogger:
    """Writes only on the rank that owns the figures (the last rank); a no-op elsewhere."""

    def __init__(self, enabled: bool, config: RunConfig):
        self.enabled = enabled
        self._jsonl = None
        self._trackers: list = []
        if not enabled:
            return
        args = config.training
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "log.jsonl", "a", encoding="utf-8")
        for tracker in args.trackers:
            if tracker == "tensorboard":
                self._trackers.append(_TensorBoardTracker(Path(args.tensorboard_dir or output_dir / "tensorboard")))
            else:
                self._trackers.append(_WandbTracker(config, output_dir))

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def scalars(self, kind: str, step: int, values: dict[str, Any], line: Optional[str] = None) -> None:
        """Record ``values`` of event ``kind`` ("train", "eval", ...) at optimizer step ``step``."""
        if not self.enabled:
            return
        if line:
            self.message(line)
        self._jsonl.write(strict_json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        numbers = {name: value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self._trackers:
            tracker.log(kind, step, numbers)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()
