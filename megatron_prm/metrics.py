"""Step- and record-level PRM metrics, computed from complete (gathered) predictions.

Everything here is a pure function of ``StepPredictions``, so a metric over data-parallel ranks is
computed from the concatenation of every rank's predictions: exact, not a mean of per-rank means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepPredictions:
    """Flat arrays over labelled steps: P(good), target P(good), record id and step index."""

    p_good: np.ndarray
    targets: np.ndarray
    record_ids: np.ndarray
    step_ids: np.ndarray

    @classmethod
    def concatenate(cls, parts: list["StepPredictions"]) -> "StepPredictions":
        if not parts:
            return cls(*(np.zeros(0) for _ in range(4)))
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("p_good", "targets", "record_ids", "step_ids")))


def binary_auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half); None when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over ties (1-based), the Mann-Whitney U statistic.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def first_error_index(step_is_good: np.ndarray) -> int:
    """Index of the first step judged bad, or -1 when all are good (ProcessBench's prediction)."""
    bad = np.flatnonzero(~step_is_good)
    return int(bad[0]) if bad.size else -1


def first_error_f1(predictions: StepPredictions, threshold: float) -> dict[str, float]:
    """ProcessBench: accuracy on erroneous records (first error found exactly), on correct records
    (predicted -1), and their harmonic mean. Records are those with at least one labelled step."""
    order = np.lexsort((predictions.step_ids, predictions.record_ids))
    records = predictions.record_ids[order]
    p_good = predictions.p_good[order]
    targets = predictions.targets[order]
    boundaries = np.flatnonzero(np.diff(records)) + 1
    hits_err = n_err = hits_cor = n_cor = 0
    for p, t in zip(np.split(p_good, boundaries), np.split(targets, boundaries)):
        if p.size == 0:
            continue
        label = first_error_index(t >= 0.5)
        predicted = first_error_index(p >= threshold)
        if label == -1:
            n_cor += 1
            hits_cor += predicted == -1
        else:
            n_err += 1
            hits_err += predicted == label
    acc_err = _safe_div(hits_err, n_err)
    acc_cor = _safe_div(hits_cor, n_cor)
    return {
        "acc_erroneous": acc_err,
        "acc_correct": acc_cor,
        "first_error_f1": _safe_div(2 * acc_err * acc_cor, acc_err + acc_cor),
        "records_erroneous": n_err,
        "records_correct": n_cor,
    }


def step_metrics(predictions: StepPredictions, threshold: float) -> dict[str, float | None]:
    """Accuracy, negative-class (bad step) precision/recall/F1 and AUROC of P(good)."""
    good_true = predictions.targets >= 0.5
    good_pred = predictions.p_good >= threshold
    n = good_true.size
    bad_true, bad_pred = ~good_true, ~good_pred
    tp_bad = int((bad_true & bad_pred).sum())
    precision = _safe_div(tp_bad, int(bad_pred.sum()))
    recall = _safe_div(tp_bad, int(bad_true.sum()))
    return {
        "steps": n,
        "accuracy": _safe_div(int((good_true == good_pred).sum()), n),
        "neg_precision": precision,
        "neg_recall": recall,
        "neg_f1": _safe_div(2 * precision * recall, precision + recall),
        "auroc": binary_auroc(predictions.p_good, good_true),
        "positive_share": _safe_div(int(good_true.sum()), n),
    }


def prm_metrics(predictions: StepPredictions, threshold: float, process_reward: bool = True) -> dict:
    """All evaluation figures; first-error metrics only where every step is labelled (PRM mode)."""
    metrics = step_metrics(predictions, threshold)
    if process_reward:
        metrics.update(first_error_f1(predictions, threshold))
    return metrics


def majority_baseline(predictions: StepPredictions, majority_is_good: bool, process_reward: bool = True) -> dict:
    """The same figures for a constant predictor of the training set's majority class."""
    constant = np.full(predictions.p_good.shape, 1.0 if majority_is_good else 0.0)
    baseline = StepPredictions(constant, predictions.targets, predictions.record_ids, predictions.step_ids)
    return prm_metrics(baseline, 0.5, process_reward)
