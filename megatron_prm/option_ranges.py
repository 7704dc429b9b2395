"""The allowed range of every numeric command-line option of every command and tool, in one table.

:class:`megatron_prm.cli.ArgumentParser` wraps the type of each option named here, so ``score --batch-size 0``
or ``convert_hf.py import --tp -1`` is a usage error naming the option, never a ZeroDivisionError later or a
value silently accepted. A numeric option missing from the table is a programming error (adding it
raises, and a test checks every parser).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

# Longer than any released model's context; a larger max_seq_len is a typo (and int32 positions overflow
# long before memory would run out).
MAX_SEQ_LEN = 4 * 1024 * 1024


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``low < value`` where ``low_open``); None: unbounded on that side."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False

    def problem(self, value: float) -> Optional[str]:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'above' if self.low_open else 'at least'} {self.low:g}, got {value:g}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}, got {value:g}"
        return None


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)

# Option destination -> range, for every numeric option of `megatron-prm` and of tools/*.py.
OPTION_RANGES: dict[str, Range] = {
    # megatron-prm
    "max_seq_len": Range(2, MAX_SEQ_LEN),
    "max_prompt_len": Range(1, MAX_SEQ_LEN),
    "workers": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "threshold": Range(0, 1),
    "nodes": AT_LEAST_1,
    "gpus_per_node": AT_LEAST_1,
    "gpu_memory_gib": POSITIVE,
    # tools/convert_hf.py
    "tp": AT_LEAST_1,
    "pp": AT_LEAST_1,
    "max_shard_size": AT_LEAST_1,
    # tools/benchmark*.py
    "steps": AT_LEAST_1,
    "warmup": Range(0),
    "micro_batches": AT_LEAST_1,
    "seq_len": Range(2, MAX_SEQ_LEN),
    "sample_len": AT_LEAST_1,
    "step_len": AT_LEAST_1,
    "layers": AT_LEAST_1,
    "hidden": AT_LEAST_1,
    "ffn": AT_LEAST_1,
    "heads": AT_LEAST_1,
    "kv_heads": AT_LEAST_1,
    "vocab": AT_LEAST_1,
    "tensor_parallel": AT_LEAST_1,
    "pipeline_parallel": AT_LEAST_1,
    "peak_tflops": POSITIVE,
    "head_vocab": AT_LEAST_1,
    "head_hidden": AT_LEAST_1,
    "parameters": Range(1),
    "tensor_elements": AT_LEAST_1,
    "records": AT_LEAST_1,
    "buffer_size": AT_LEAST_1,
    "microbatches": AT_LEAST_1,
    "epochs": AT_LEAST_1,
    "tokenize_records": AT_LEAST_1,
    "lazy_records": AT_LEAST_1,
}


class RangeChecked:
    """An argparse ``type``: ``convert`` the text, then refuse a value outside ``allowed``."""

    def __init__(self, convert: Callable[[str], Any], allowed: Range, option: str):
        self.convert = convert
        self.allowed = allowed
        self.option = option
        self.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its messages

    def __call__(self, text: str) -> Any:
        value = self.convert(text)
        problem = self.allowed.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}")
        return value


def range_checked(action: argparse.Action) -> argparse.Action:
    """Give a numeric option its range from :data:`OPTION_RANGES` (called for every option a
    :class:`megatron_prm.cli.ArgumentParser` adds)."""
    if isinstance(action.type, RangeChecked) or not action.option_strings:
        return action
    allowed = OPTION_RANGES.get(action.dest)
    if allowed is None:
        if action.type in (int, float):
            raise RuntimeError(f"option {action.option_strings[0]} has no range in option_ranges.OPTION_RANGES")
        return action
    action.type = RangeChecked(action.type or str, allowed, action.option_strings[0])
    return action
