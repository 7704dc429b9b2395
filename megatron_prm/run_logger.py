"""Training log: readable lines on stdout, one JSON object per event in ``log.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from megatron_prm import optional


class RunLogger:
    """Writes only on the rank that owns the figures (the last rank); a no-op elsewhere."""

    def __init__(self, enabled: bool, output_dir: str | Path, tensorboard_dir: Optional[str] = None):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if tensorboard_dir:
            optional.require("tensorboard", "tensorboard_dir")  # on every rank, so that all of them stop
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=tensorboard_dir)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def scalars(self, kind: str, step: int, values: dict[str, Any], line: Optional[str] = None) -> None:
        """Record ``values`` of event ``kind`` ("train", "eval", ...) at optimizer step ``step``."""
        if not self.enabled:
            return
        if line:
            self.message(line)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
