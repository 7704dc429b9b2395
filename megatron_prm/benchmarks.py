"""``megatron-prm evaluate``: the field's PRM benchmarks computed from a ``score`` output file.

Each function takes the scored records (one dict per line of ``score``'s JSONL) and returns a dict
of figures; :data:`HEADLINE` names the figure each benchmark reports first.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Optional

import numpy as np

from megatron_prm.metrics import binary_auroc

HEADLINE = {"processbench": "average_f1", "prmbench": "prmbench_score", "steps": "accuracy",
            "best-of-n": "accuracy"}


class ScoresError(ValueError):
    """A scores file that lacks what a benchmark needs."""


def _step_scores(record: dict, where: str) -> list[float]:
    scores = record.get("step_scores")
    if scores is None:
        raise ScoresError(f"{where}: no step_scores (scored with process_reward false?)")
    return scores


def predicted_first_error(scores: list[float], threshold: float) -> int:
    """ProcessBench's prediction: the first step with P(+) < threshold (a tie counts as good), else -1."""
    for index, p in enumerate(scores):
        if p < threshold:
            return index
    return -1


def _harmonic(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b else 0.0


def _subset(record: dict) -> str:
    if record.get("subset"):
        return str(record["subset"])
    identifier = str(record.get("id", ""))
    return identifier.rsplit("-", 1)[0] if "-" in identifier else "all"


def _first_error_label(record: dict, where: str) -> int:
    for key in ("first_error", "label"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ScoresError(f"{where}: no first-error label (first_error or label, an int; -1 = no error)")


def processbench_subset(items: list[tuple[list[float], int]], threshold: float) -> dict:
    """Accuracy on erroneous items (exact first-error index), on correct items (predicted -1), and
    their harmonic mean (F1); an accuracy is None when its class is absent, and then so is F1."""
    erroneous = [predicted_first_error(s, threshold) == label for s, label in items if label != -1]
    correct = [predicted_first_error(s, threshold) == -1 for s, label in items if label == -1]
    acc_err = sum(erroneous) / len(erroneous) if erroneous else None
    acc_cor = sum(correct) / len(correct) if correct else None
    return {"items": len(items), "erroneous": len(erroneous), "correct": len(correct),
            "acc_erroneous": acc_err, "acc_correct": acc_cor, "f1": _harmonic(acc_err, acc_cor)}


def tune_threshold(items: list[tuple[list[float], int]]) -> float:
    """The threshold that maximises the subset's F1 over every distinct decision point (the smallest
    such threshold on ties). Predictions change only where the threshold passes a score, so testing
    just above each score (and 0) covers every outcome."""
    candidates = sorted({0.0, *(math.nextafter(p, math.inf) for scores, _ in items for p in scores)})
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        f1 = processbench_subset(items, threshold)["f1"]
        if f1 is not None and f1 > best_f1:
            best, best_f1 = threshold, f1
    return best


def processbench(records: list[dict], threshold: Optional[float] = 0.5, tune_on: Optional[str] = None) -> dict:
    by_subset: dict[str, list[tuple[list[float], int]]] = defaultdict(list)
    for i, record in enumerate(records):
        where = f"record {i}"
        by_subset[_subset(record)].append((_step_scores(record, where), _first_error_label(record, where)))
    if tune_on is not None:
        if tune_on not in by_subset:
            raise ScoresError(f"no subset {tune_on!r} to tune the threshold on; subsets: {', '.join(sorted(by_subset))}")
        threshold = tune_threshold(by_subset[tune_on])
    subsets = {name: processbench_subset(items, threshold) for name, items in sorted(by_subset.items())}
    f1s = [s["f1"] for s in subsets.values() if s["f1"] is not None]
    return {"threshold": threshold, "tuned_on": tune_on, "subsets": subsets,
            "average_f1": sum(f1s) / len(f1s) if f1s else None}


def _labelled_steps(records: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """P(+) and targets of every scored step that carries a label (soft labels rounded at 0.5)."""
    scores, targets = [], []
    for i, record in enumerate(records):
        labels = record.get("labels")
        if labels is None:
            raise ScoresError(f"record {i}: no labels")
        for p, label in zip(_step_scores(record, f"record {i}"), labels):
            scores.append(p)
            targets.append(label == "+" if isinstance(label, str) else float(label) >= 0.5)
    return np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
    tp = float(np.sum(predicted & actual))
    precision = tp / predicted.sum() if predicted.sum() else 0.0
    recall = tp / actual.sum() if actual.sum() else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def prmbench(records: list[dict], threshold: float = 0.5) -> dict:
    """PRMBench's PRMScore: 0.5 x F1 of correct steps + 0.5 x F1 of erroneous steps, micro-averaged."""
    scores, good = _labelled_steps(records)
    predicted_good = scores >= threshold
    f1_correct, f1_erroneous = _f1(predicted_good, good), _f1(~predicted_good, ~good)
    return {"threshold": threshold, "steps": int(scores.size), "f1_correct": f1_correct,
            "f1_erroneous": f1_erroneous, "prmbench_score": 0.5 * f1_correct + 0.5 * f1_erroneous}


def expected_calibration_error(scores: np.ndarray, good: np.ndarray, bins: int = 10) -> Optional[float]:
    """Mean |P(+) - share of good steps| over equal-width bins of P(+), weighted by the bins' sizes."""
    if scores.size == 0:
        return None
    index = np.minimum((scores * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.sum() / scores.size * abs(scores[members].mean() - good[members].mean())
    return float(error)


def steps(records: list[dict], threshold: float = 0.5) -> dict:
    scores, good = _labelled_steps(records)
    predicted_good = scores >= threshold
    bad, predicted_bad = ~good, ~predicted_good
    precision = float((predicted_bad & bad).sum() / predicted_bad.sum()) if predicted_bad.any() else 0.0
    recall = float((predicted_bad & bad).sum() / bad.sum()) if bad.any() else 0.0
    return {"threshold": threshold, "steps": int(scores.size),
            "accuracy": float((predicted_good == good).mean()) if scores.size else None,
            "neg_precision": precision, "neg_recall": recall,
            "neg_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "auroc": binary_auroc(scores, good), "ece": expected_calibration_error(scores, good)}


def best_of_n(records: list[dict]) -> dict:
    """Per group: the candidate with the highest aggregate (the first on ties; unscored candidates rank
    last) is right or wrong; beside it majority vote over ``answer`` and pass@N. A group whose
    candidates are all unscored counts as wrong and is reported in ``unscored_groups``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for i, record in enumerate(records):
        for key in ("group", "correct"):
            if key not in record:
                raise ScoresError(f"record {i}: no {key!r} field (best-of-n needs group and correct)")
        groups[str(record["group"])].append(record)
    if not groups:
        raise ScoresError("no records")
    aggregates = sorted({name for r in records for name in r.get("aggregates", {})})
    chosen_right = {name: 0 for name in aggregates}
    unscored = {name: 0 for name in aggregates}
    majority_right = pass_at_n = 0
    for candidates in groups.values():
        pass_at_n += any(bool(c["correct"]) for c in candidates)
        for name in aggregates:
            values = [c.get("aggregates", {}).get(name) for c in candidates]
            if all(v is None for v in values):
                unscored[name] += 1
                continue
            best = max(range(len(values)), key=lambda k: (values[k] is not None, values[k] or 0.0, -k))
            chosen_right[name] += bool(candidates[best]["correct"])
        answers = [c.get("answer") for c in candidates if c.get("answer") is not None]
        if answers:
            top = Counter(answers).most_common(1)[0][0]  # first-seen answer on ties
            majority_right += any(bool(c["correct"]) for c in candidates if c.get("answer") == top)
    count = len(groups)
    accuracy = {name: chosen_right[name] / count for name in aggregates}
    # The headline aggregate is fixed in advance (min, the usual choice), not picked by its result.
    headline = "min" if "min" in accuracy else (aggregates[0] if aggregates else None)
    return {"groups": count, "candidates": len(records),
            "mean_candidates_per_group": len(records) / count,
            "prm_accuracy": accuracy, "unscored_groups": unscored,
            "accuracy": accuracy.get(headline) if headline else None, "headline_aggregate": headline,
            "majority_vote_accuracy": majority_right / count, "pass_at_n": pass_at_n / count}
