import numpy as np
import pytest

from megatron_prm import benchmarks
from megatron_prm.metrics import StepPredictions, binary_auroc, majority_baseline, prm_metrics, step_figures


def preds(records):
    """records: list of (p_good list, target list)."""
    p, t, r, s = [], [], [], []
    for rid, (pg, tg) in enumerate(records):
        p += pg
        t += tg
        r += [rid] * len(pg)
        s += list(range(len(pg)))
    return StepPredictions(np.array(p, float), np.array(t, float), np.array(r), np.array(s))


def test_auroc_by_hand():
    # positives 0.9, 0.4; negatives 0.6, 0.1 -> pairs won: (0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1) = 3/4
    assert binary_auroc(np.array([0.9, 0.4, 0.6, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    # a tie counts one half
    assert binary_auroc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5
    assert binary_auroc(np.array([0.5, 0.7]), np.array([1, 1], bool)) is None


def test_step_metrics_by_hand():
    p = preds([([0.9, 0.2, 0.3], [1, 0, 1]), ([0.6, 0.4], [0, 0])])
    m = step_figures(p.p_good, p.targets >= 0.5, 0.5)
    # predicted bad: steps with p < 0.5 -> 0.2, 0.3, 0.4 ; truly bad: 0.2, 0.6, 0.4
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["neg_precision"] == pytest.approx(2 / 3)
    assert m["neg_recall"] == pytest.approx(2 / 3)
    assert m["neg_f1"] == pytest.approx(2 / 3)


def test_first_error_f1_by_hand_with_threshold_ties():
    records = [
        ([0.9, 0.9, 0.1], [1, 1, 0]),   # error at 2, predicted 2: hit
        ([0.9, 0.4, 0.1], [1, 1, 0]),   # error at 2, predicted 1: miss
        ([0.5, 0.5], [1, 1]),           # correct; p == threshold counts as good: predicted -1, hit
        ([0.9, 0.2], [1, 1]),           # correct, predicted 1: miss
        ([0.9, 0.8], [1, 1]),           # correct, hit
    ]
    m = prm_metrics(preds(records), 0.5)
    assert m["acc_erroneous"] == 0.5 and m["acc_correct"] == pytest.approx(2 / 3)
    assert m["first_error_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (m["records_erroneous"], m["records_correct"]) == (2, 3)


def test_a_class_absent_from_the_data_is_none_in_training_eval_and_evaluate_alike():
    records = [([0.9], [1]), ([0.8, 0.7], [1, 1])]  # no erroneous record, no bad step
    m = prm_metrics(preds(records), 0.5)
    assert m["acc_correct"] == 1.0 and m["acc_erroneous"] is None and m["first_error_f1"] is None
    assert m["neg_recall"] is None and m["neg_precision"] is None and m["neg_f1"] is None and m["auroc"] is None
    scored = [{"step_scores": p, "labels": ["+" if t else "-" for t in targets], "first_error": -1}
              for p, targets in records]
    subset = benchmarks.processbench(scored)["subsets"]["all"]
    assert (subset["acc_correct"], subset["acc_erroneous"], subset["f1"]) == (
        m["acc_correct"], m["acc_erroneous"], m["first_error_f1"])
    steps = benchmarks.steps(scored)
    assert all(steps[k] == m[k] for k in ("accuracy", "neg_precision", "neg_recall", "neg_f1", "auroc"))


def test_record_order_does_not_matter():
    a = preds([([0.9, 0.1], [1, 0]), ([0.2, 0.3], [0, 0])])
    shuffled = StepPredictions(a.p_good[::-1].copy(), a.targets[::-1].copy(), a.record_ids[::-1].copy(),
                               a.step_ids[::-1].copy())
    assert prm_metrics(a, 0.5) == prm_metrics(shuffled, 0.5)


def test_majority_baseline_predicts_a_constant():
    p = preds([([0.1, 0.1], [1, 0]), ([0.1], [1])])
    m = majority_baseline(p, majority_is_good=True)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["first_error_f1"] == 0.0 and m["auroc"] == 0.5
