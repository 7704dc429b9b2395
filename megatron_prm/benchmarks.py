"""``megatron-prm evaluate``: the field's PRM benchmarks computed from a ``score`` output file.

Each benchmark reads what it needs from the scored records (one JSON object per line of ``score``'s
output), checks it (P(good) finite and in [0, 1], labels, group fields; an error names the file, record
and field), and computes its figures with :mod:`megatron_prm.metrics`. :data:`HEADLINE` names the
figure each benchmark reports first.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import numpy as np

from megatron_prm import metrics
from megatron_prm.data.convert import PRMBENCH_CORRECT
from megatron_prm.data.records import iter_raw_records
from megatron_prm.metrics import ScoresError, check_threshold

HEADLINE = {"processbench": "average_f1", "prmbench": "prmbench_score", "steps": "accuracy",
            "best-of-n": "accuracy"}


@dataclass(frozen=True)
class ScoredRecords:
    """The records of a scores file, with where each came from (for error messages)."""

    path: str
    records: list
    lines: list

    @classmethod
    def read(cls, path: str | Path) -> "ScoredRecords":
        rows = list(iter_raw_records(path))
        return cls(str(path), [raw for _, _, raw in rows], [line for _, line, _ in rows])

    @classmethod
    def of(cls, records: "Sequence[dict] | ScoredRecords", path: str = "<records>") -> "ScoredRecords":
        if isinstance(records, ScoredRecords):
            return records
        return cls(path, list(records), [None] * len(records))

    def fail(self, index: int, field: str, problem: str) -> NoReturn:
        line = self.lines[index]
        raise ScoresError(f"{self.path}: record {index}" + (f" (line {line})" if line is not None else "")
                          + f", field {field!r}: {problem}")

    def record(self, index: int) -> dict:
        record = self.records[index]
        if not isinstance(record, dict):
            self.fail(index, "<record>", f"must be a JSON object, got {type(record).__name__}")
        return record

    def field(self, index: int, name: str, why: str) -> Any:
        record = self.record(index)
        if name not in record:
            self.fail(index, name, f"is missing ({why})")
        return record[name]

    def probability(self, index: int, field: str, value: Any) -> float:
        # Compared as it is: an integer too large for a float is out of range, not an OverflowError.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            self.fail(index, field, f"{value!r} is not a probability (a finite number in [0, 1])")
        return float(value)

    def step_scores(self, index: int) -> list[float]:
        scores = self.field(index, "step_scores", "scored with process_reward false?")
        if not isinstance(scores, list):
            self.fail(index, "step_scores", f"must be a list of P(good), got {type(scores).__name__}")
        return [self.probability(index, f"step_scores[{k}]", p) for k, p in enumerate(scores)]

    def labels_good(self, index: int) -> list[bool]:
        """Whether each labelled step is good: ``+``/``-``, or a soft label in [0, 1] rounded at 0.5."""
        labels = self.field(index, "labels", "the steps' labels")
        if not isinstance(labels, list):
            self.fail(index, "labels", f"must be a list, got {type(labels).__name__}")
        good = []
        for k, label in enumerate(labels):
            if label in ("+", "-"):
                good.append(label == "+")
            else:
                good.append(self.probability(index, f"labels[{k}]", label) >= 0.5)
        return good

    def __len__(self) -> int:
        return len(self.records)


def _subset(record: dict) -> str:
    if record.get("subset"):
        return str(record["subset"])
    identifier = str(record.get("id", ""))
    return identifier.rsplit("-", 1)[0] if "-" in identifier else "all"


def _first_error_label(scored: ScoredRecords, index: int) -> int:
    record = scored.record(index)
    for key in ("first_error", "label"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    scored.fail(index, "first_error", "missing (first_error or label, an int; -1 = no error)")


def processbench(records, threshold: Optional[float] = 0.5, tune_on: Optional[str] = None) -> dict:
    """ProcessBench per subset (``subset``, else the ``id`` before its last ``-``) and their mean F1."""
    scored = ScoredRecords.of(records)
    by_subset: dict[str, list[tuple[list[float], int]]] = defaultdict(list)
    for i in range(len(scored)):
        by_subset[_subset(scored.record(i))].append((scored.step_scores(i), _first_error_label(scored, i)))
    if tune_on is not None:
        if tune_on not in by_subset:
            raise ScoresError(f"no subset {tune_on!r} to tune the threshold on; subsets: {', '.join(sorted(by_subset))}")
        threshold = metrics.tune_threshold(by_subset[tune_on])
    else:
        threshold = check_threshold(threshold)
    subsets = {name: metrics.first_error_figures(items, threshold) for name, items in sorted(by_subset.items())}
    f1s = [s["f1"] for s in subsets.values() if s["f1"] is not None]
    return {"threshold": threshold, "tuned_on": tune_on, "subsets": subsets,
            "average_f1": sum(f1s) / len(f1s) if f1s else None}


def _prmbench_error_steps(scored: ScoredRecords, index: int) -> list[int]:
    """The row's 1-indexed erroneous steps: ``error_steps`` as PRMBench gives them (indices past the last
    step included), else the ``-`` labels."""
    record = scored.record(index)
    if "error_steps" not in record:
        return [k + 1 for k, good in enumerate(scored.labels_good(index)) if not good]
    errors = record["error_steps"]
    if not isinstance(errors, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in errors):
        scored.fail(index, "error_steps", f"must be a list of 1-indexed step numbers, got {errors!r}")
    return errors


def prmbench(records, threshold: float = 0.5, rule: str = "gt") -> dict:
    """PRMBench's PRMScore as its official scorer computes it, in total and per ``classification``; the
    ``correct`` class (the original processes, PRMBench's all-correct samples) is reported on its own,
    outside the total."""
    scored = ScoredRecords.of(records)
    threshold = check_threshold(threshold)
    rows = [(str(scored.record(i).get("classification", "unclassified")), scored.step_scores(i),
             _prmbench_error_steps(scored, i)) for i in range(len(scored))]
    prmbench_fields = ("classification", "error_steps")
    if len(scored) and not any(field in scored.record(i) for i in range(len(scored)) for field in prmbench_fields):
        if any("first_error" in scored.record(i) for i in range(len(scored))):
            raise ScoresError(f"{scored.path}: these are ProcessBench scores (first_error, no PRMBench "
                              "classification or error_steps): use --benchmark processbench")
    return metrics.prmbench_figures(rows, threshold, rule, excluded_from_total=(PRMBENCH_CORRECT,))


def steps(records, threshold: float = 0.5) -> dict:
    """Every labelled step judged alone (good when P(good) >= threshold)."""
    scored = ScoredRecords.of(records)
    threshold = check_threshold(threshold)
    scores, good = [], []
    for i in range(len(scored)):
        for p, label in zip(scored.step_scores(i), scored.labels_good(i)):
            scores.append(p)
            good.append(label)
    return {"threshold": threshold, **metrics.step_figures(np.asarray(scores), np.asarray(good, dtype=bool),
                                                             threshold)}


def best_of_n(records, tie_break: str = "expected") -> dict:
    """Selection among the candidates of each ``group``: the PRM's pick per aggregate, majority and
    PRM-weighted votes over ``answer``, pass@N. The headline is the pick by ``min`` (fixed in advance,
    not chosen by its result)."""
    scored = ScoredRecords.of(records)
    groups: dict[str, list[metrics.Candidate]] = defaultdict(list)
    for i in range(len(scored)):
        group = scored.field(i, "group", "best-of-n needs group and correct")
        correct = scored.field(i, "correct", "best-of-n needs group and correct")
        if not isinstance(correct, bool):
            scored.fail(i, "correct", f"must be true or false, got {correct!r}")
        aggregates = scored.record(i).get("aggregates") or {}
        if not isinstance(aggregates, dict):
            scored.fail(i, "aggregates", f"must be an object of scores, got {type(aggregates).__name__}")
        values = {name: None if value is None else scored.probability(i, f"aggregates.{name}", value)
                  for name, value in aggregates.items()}
        answer = scored.record(i).get("answer")
        groups[str(group)].append(metrics.Candidate(correct, None if answer is None else str(answer), values))
    if not groups:
        raise ScoresError(f"{scored.path}: no records")
    result = metrics.best_of_n_figures(list(groups.values()), tie_break)
    names = list(result["prm_accuracy"])
    headline = "min" if "min" in names else (names[0] if names else None)
    return {**result, "mean_candidates_per_group": result["candidates"] / result["groups"],
            "accuracy": result["prm_accuracy"].get(headline) if headline else None, "headline_aggregate": headline}
