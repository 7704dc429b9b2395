"""Every figure the project reports, computed once: step classification, ProcessBench's first-error F1,
PRMBench's PRMScore, best-of-N selection, AUROC and calibration.

Functions take plain arrays (already validated: finite P(good) in [0, 1]); ``evaluate``'s score-file
adapters (:mod:`megatron_prm.benchmarks`), the training run's evaluation and the demo all come here.
A figure that is undefined on the data (a ratio over an empty class) is None, never 0 or NaN; PRMBench's
figures alone keep its scorer's -1 sentinels, so that they equal its reports.
Everything is a pure function of complete (gathered) predictions, so a metric over data-parallel ranks
is computed from the concatenation of every rank's predictions: exact, not a mean of per-rank means.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

TIE_BREAKS = ("expected", "first")
PRMBENCH_RULES = ("gt", "ge")  # a step is valid when P(good) > threshold (PRMBench's scorer) or >= it
PRMBENCH_VALID_ONLY_CLASS = "multi_solutions"  # scored by the F1 of valid steps alone in PRMBench's report


class ScoresError(ValueError):
    """Scores, labels or settings a metric cannot use; the message names the file, record and field."""


def check_threshold(threshold: float, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ScoresError(f"{name} must be a finite number in [0, 1], got {threshold!r}")
    return float(threshold)


def ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator else None


def f1_score(tp: int, fp: int, fn: int) -> Optional[float]:
    """F1 of one class from its counts, as ``2 p r / (p + r)``. None when the class is neither present nor
    predicted; 0.0 when precision or recall is 0 or undefined (then no true positive exists)."""
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    if precision is None and recall is None:
        return None
    if precision is None or recall is None or precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def harmonic_mean(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b else 0.0


def binary_auroc(scores: np.ndarray, positives: np.ndarray) -> Optional[float]:
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


# --- steps judged one by one -------------------------------------------------------------------------

def step_figures(p_good: np.ndarray, good: np.ndarray, threshold: float) -> dict:
    """Accuracy, bad-step precision / recall / F1, AUROC and calibration of P(good); a step is judged good
    when P(good) >= threshold."""
    p_good = np.asarray(p_good, dtype=np.float64)
    good = np.asarray(good, dtype=bool)
    judged_good = p_good >= threshold
    bad, judged_bad = ~good, ~judged_good
    tp_bad = int((bad & judged_bad).sum())
    return {
        "steps": int(p_good.size),
        "accuracy": ratio(int((good == judged_good).sum()), p_good.size),
        "neg_precision": ratio(tp_bad, int(judged_bad.sum())),
        "neg_recall": ratio(tp_bad, int(bad.sum())),
        "neg_f1": f1_score(tp_bad, int((good & judged_bad).sum()), int((bad & judged_good).sum())),
        "auroc": binary_auroc(p_good, good),
        "ece": expected_calibration_error(p_good, good),
        "positive_share": ratio(int(good.sum()), p_good.size),
    }


# --- ProcessBench: the first erroneous step ---------------------------------------------------------

def predicted_first_error(scores: Sequence[float], threshold: float) -> int:
    """ProcessBench's prediction: the first step with P(+) < threshold (a tie counts as good), else -1."""
    for index, p in enumerate(scores):
        if p < threshold:
            return index
    return -1


def first_error_figures(items: Sequence[tuple[Sequence[float], int]], threshold: float) -> dict:
    """Accuracy on erroneous items (exact first-error index), on correct items (predicted -1), and their
    harmonic mean (F1); an accuracy is None when its class is absent, and then so is F1."""
    erroneous = [predicted_first_error(s, threshold) == label for s, label in items if label != -1]
    correct = [predicted_first_error(s, threshold) == -1 for s, label in items if label == -1]
    acc_err, acc_cor = ratio(sum(erroneous), len(erroneous)), ratio(sum(correct), len(correct))
    return {"items": len(items), "erroneous": len(erroneous), "correct": len(correct),
            "acc_erroneous": acc_err, "acc_correct": acc_cor, "f1": harmonic_mean(acc_err, acc_cor)}


def tune_threshold(items: Sequence[tuple[Sequence[float], int]]) -> float:
    """The threshold that maximises the subset's F1 over every distinct decision point (the smallest
    such threshold on ties). Predictions change only where the threshold passes a score, so testing
    just above each score (and 0) covers every outcome."""
    candidates = sorted({0.0, *(math.nextafter(p, math.inf) for scores, _ in items for p in scores)})
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        f1 = first_error_figures(items, threshold)["f1"]
        if f1 is not None and f1 > best_f1:
            best, best_f1 = threshold, f1
    return best


# --- PRMBench ------------------------------------------------------------------------------------------

def prmbench_f1(tp: int, fp: int, fn: int) -> float:
    """F1 as PRMBench's scorer computes it, its sentinels included: a precision or recall over an empty
    denominator is -1, and F1 is -1 where precision + recall is 0; otherwise ``2 p r / (p + r)`` with the
    sentinels taken as numbers. So with no true positive F1 is -1 (both error kinds present, or none) or
    -0.0 (one kind only). Kept as is so that reports agree with PRMBench's to the last bit."""
    precision = tp / (tp + fp) if tp + fp else -1
    recall = tp / (tp + fn) if tp + fn else -1
    return 2 * precision * recall / (precision + recall) if precision + recall else -1


def prmbench_score(f1_valid: float, f1_invalid: float, classification: Optional[str] = None) -> float:
    """PRMScore as PRMBench's report computes it (mr_visualize's ``get_prmscore_from_current_res_dict``):
    0.5 x F1 of valid + 0.5 x F1 of invalid steps, the F1 of valid steps alone for ``multi_solutions`` (its
    rows name no error step), and 0 where the result is not positive (a sentinel of -1 pulls it down)."""
    score = f1_valid if classification == PRMBENCH_VALID_ONLY_CLASS else f1_valid * 0.5 + f1_invalid * 0.5
    return score if score > 0 else 0


@dataclass
class Confusion:
    """PRMBench's counts: TP a valid step judged valid, FP an error step judged valid, TN an error step
    judged invalid, FN a valid step judged invalid."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, other: "Confusion") -> None:
        self.tp, self.fp, self.tn, self.fn = (self.tp + other.tp, self.fp + other.fp, self.tn + other.tn,
                                              self.fn + other.fn)

    def figures(self, classification: Optional[str] = None) -> dict:
        f1_valid = prmbench_f1(self.tp, self.fp, self.fn)
        f1_invalid = prmbench_f1(self.tn, self.fn, self.fp)
        return {"prmbench_score": prmbench_score(f1_valid, f1_invalid, classification), "f1_correct": f1_valid,
                "f1_erroneous": f1_invalid, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def prmbench_confusion(scores: Sequence[float], error_steps: Sequence[int], threshold: float,
                       rule: str = "gt") -> Confusion:
    """One row as PRMBench's ``eval_on_hallucination_step``: every scored step is judged valid when its
    score is above the threshold (``gt``, the official rule; ``ge``: at or above); the 1-indexed
    ``error_steps`` name the invalid ones (an index past the last step is never met)."""
    errors = {step - 1 for step in error_steps}
    counts = Confusion()
    for index, p in enumerate(scores):
        valid = p > threshold if rule == "gt" else p >= threshold
        if index in errors:
            counts.fp += valid
            counts.tn += not valid
        else:
            counts.tp += valid
            counts.fn += not valid
    return counts


def prmbench_figures(rows: Sequence[tuple[str, Sequence[float], Sequence[int]]], threshold: float,
                     rule: str = "gt", excluded_from_total: tuple[str, ...] = ()) -> dict:
    """PRMScore = 0.5 x F1 of valid steps + 0.5 x F1 of invalid steps, over the counts summed across rows
    ``(classification, step scores, error_steps)``, in total (without the classes in
    ``excluded_from_total``) and per class."""
    if rule not in PRMBENCH_RULES:
        raise ScoresError(f"the PRMBench threshold rule must be one of {', '.join(PRMBENCH_RULES)}, got {rule!r}")
    total, per_class = Confusion(), {}
    for classification, scores, error_steps in rows:
        counts = prmbench_confusion(scores, error_steps, threshold, rule)
        per_class.setdefault(classification, Confusion()).add(counts)
        if classification not in excluded_from_total:
            total.add(counts)
    return {"threshold": threshold, "rule": rule, "rows": len(rows), **total.figures(),
            "classes": {name: counts.figures(name) for name, counts in sorted(per_class.items())}}


# --- best of N -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One solution of a group: whether it is right, its final answer, its aggregate scores by name."""

    correct: bool
    answer: Optional[str] = None
    aggregates: dict = field(default_factory=dict)


def _expected_pick(correct: Sequence[bool], values: Sequence[Optional[float]], tie_break: str) -> Optional[float]:
    """Whether the highest-valued option is right: the first on ties, or the mean over the tied options
    (the expectation under uniform random tie-breaking). None when no option has a value."""
    scored = [k for k, v in enumerate(values) if v is not None]
    if not scored:
        return None
    best = max(values[k] for k in scored)
    tied = [k for k in scored if values[k] == best]
    if tie_break == "first":
        return float(correct[tied[0]])
    return sum(correct[k] for k in tied) / len(tied)


def best_of_n_figures(groups: Sequence[Sequence[Candidate]], tie_break: str = "expected") -> dict:
    """Per group of candidates, whether a selection method picks a right one, averaged over groups:
    the PRM's pick (highest aggregate), majority vote over answers, PRM-weighted vote (the answer whose
    candidates' aggregates sum highest), and pass@N. Ties are broken by ``tie_break``: ``expected``
    reports the expected accuracy under uniform random tie-breaking, ``first`` takes the first-seen
    candidate or answer. A group the PRM cannot rank (no candidate with that aggregate) counts as wrong
    and is reported in ``unscored_groups``; a group without answers counts as wrong for the votes."""
    if tie_break not in TIE_BREAKS:
        raise ScoresError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    if not groups:
        raise ScoresError("no groups")
    names = sorted({name for group in groups for c in group for name in c.aggregates})
    picked = dict.fromkeys(names, 0.0)
    weighted = dict.fromkeys(names, 0.0)
    unscored = dict.fromkeys(names, 0)
    majority = pass_at_n = 0.0
    for group in groups:
        correct = [bool(c.correct) for c in group]
        pass_at_n += any(correct)
        answers = list(dict.fromkeys(c.answer for c in group if c.answer is not None))  # first-seen order
        answer_right = [any(c.correct for c in group if c.answer == a) for a in answers]
        votes = Counter(c.answer for c in group if c.answer is not None)
        majority += _expected_pick(answer_right, [votes[a] for a in answers], tie_break) or 0.0
        for name in names:
            values = [c.aggregates.get(name) for c in group]
            outcome = _expected_pick(correct, values, tie_break)
            unscored[name] += outcome is None
            picked[name] += outcome or 0.0
            sums: list[Optional[float]] = [None] * len(answers)
            for c, value in zip(group, values):
                if c.answer is not None and value is not None:
                    k = answers.index(c.answer)
                    sums[k] = value if sums[k] is None else sums[k] + value
            weighted[name] += _expected_pick(answer_right, sums, tie_break) or 0.0
    count = len(groups)
    return {"groups": count, "candidates": sum(len(g) for g in groups), "tie_break": tie_break,
            "prm_accuracy": {n: picked[n] / count for n in names},
            "weighted_vote_accuracy": {n: weighted[n] / count for n in names},
            "unscored_groups": unscored, "majority_vote_accuracy": majority / count, "pass_at_n": pass_at_n / count}


# --- the training run's evaluation ---------------------------------------------------------------------

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

    def by_record(self) -> list[tuple[np.ndarray, int]]:
        """``(P(good) per step, first wrong step or -1)`` of every record, steps in order (targets
        below 0.5 are wrong)."""
        order = np.lexsort((self.step_ids, self.record_ids))
        boundaries = np.flatnonzero(np.diff(self.record_ids[order])) + 1
        return [(p, int(np.flatnonzero(t < 0.5)[0]) if (t < 0.5).any() else -1)
                for p, t in zip(np.split(self.p_good[order], boundaries), np.split(self.targets[order], boundaries))
                if p.size]


def prm_metrics(predictions: StepPredictions, threshold: float, process_reward: bool = True) -> dict:
    """All evaluation figures of a training run; first-error figures only where every step is labelled
    (PRM mode)."""
    metrics = step_figures(predictions.p_good, predictions.targets >= 0.5, threshold)
    if process_reward:
        first = first_error_figures(predictions.by_record(), threshold)
        metrics.update({"acc_erroneous": first["acc_erroneous"], "acc_correct": first["acc_correct"],
                        "first_error_f1": first["f1"], "records_erroneous": first["erroneous"],
                        "records_correct": first["correct"]})
    return metrics


def majority_baseline(predictions: StepPredictions, majority_is_good: bool, process_reward: bool = True) -> dict:
    """The same figures for a constant predictor of the training set's majority class."""
    constant = np.full(predictions.p_good.shape, 1.0 if majority_is_good else 0.0)
    baseline = StepPredictions(constant, predictions.targets, predictions.record_ids, predictions.step_ids)
    return prm_metrics(baseline, 0.5, process_reward)
