"""evaluate: ProcessBench, PRMBench, step and best-of-N figures against hand-computed values, the
ProcessBench oracles on the real GSM8K subset, the evaluation converters, and the demo end to end."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from conftest import run_cli, write_jsonl
from megatron_prm import benchmarks
from megatron_prm.metrics import ScoresError, predicted_first_error


def pb(subset, scores, label):
    return {"subset": subset, "step_scores": scores, "first_error": label}


def test_processbench_hand_computed_with_ties_and_an_all_correct_subset():
    records = [
        pb("a", [0.9, 0.2, 0.1], 1),   # predicted 1: right
        pb("a", [0.9, 0.8, 0.3], 1),   # predicted 2: wrong (exact index required)
        pb("a", [0.5, 0.7], -1),       # 0.5 is not below 0.5: predicted -1, right
        pb("a", [0.6, 0.4], -1),       # predicted 1: wrong
        pb("b", [0.9, 0.9], -1),       # subset b has no erroneous item
    ]
    result = benchmarks.processbench(records, threshold=0.5)
    a = result["subsets"]["a"]
    assert (a["acc_erroneous"], a["acc_correct"], a["f1"]) == (0.5, 0.5, 0.5)
    b = result["subsets"]["b"]
    assert b["acc_erroneous"] is None and b["acc_correct"] == 1.0 and b["f1"] is None
    assert result["average_f1"] == 0.5  # the mean over subsets whose F1 is defined
    assert predicted_first_error([0.5, 0.49], 0.5) == 1


def test_processbench_threshold_tuned_on_one_subset_applies_to_all():
    records = [pb("tune", [0.9, 0.3], 1), pb("tune", [0.6, 0.7], -1), pb("other", [0.8, 0.5], 1)]
    result = benchmarks.processbench(records, threshold=None, tune_on="tune")
    # On "tune", any threshold in (0.3, 0.6] gives F1 1; the smallest decision point above 0.3 is chosen.
    assert 0.3 < result["threshold"] <= 0.6 and result["subsets"]["tune"]["f1"] == 1.0
    assert result["subsets"]["other"]["acc_erroneous"] == 0.0  # 0.5 is not below the tuned threshold
    with pytest.raises(ScoresError, match="no subset 'missing'"):
        benchmarks.processbench(records, tune_on="missing")


def test_prmbench_and_steps_hand_computed():
    records = [{"labels": ["+", "-", "+"], "step_scores": [0.9, 0.2, 0.4]},
               {"labels": ["-", "+"], "step_scores": [0.7, 0.8]}]
    # predicted good: T F F T T; actual good: T F T F T
    result = benchmarks.prmbench(records)
    f1_correct = 2 * (2 / 3) * (2 / 3) / (4 / 3)  # precision 2/3, recall 2/3
    f1_erroneous = 2 * 0.5 * 0.5 / 1.0  # precision 1/2, recall 1/2
    assert result["f1_correct"] == pytest.approx(f1_correct)
    assert result["f1_erroneous"] == pytest.approx(f1_erroneous)
    assert result["prmbench_score"] == pytest.approx(0.5 * f1_correct + 0.5 * f1_erroneous)

    figures = benchmarks.steps(records)
    assert figures["accuracy"] == pytest.approx(3 / 5)
    # ProcessBench scores (first_error, neither PRMBench's classification nor error_steps) are refused.
    processbench_rows = [{**r, "first_error": 1} for r in records]
    with pytest.raises(ScoresError, match="these are ProcessBench scores .* use --benchmark processbench"):
        benchmarks.prmbench(processbench_rows)
    assert (figures["neg_precision"], figures["neg_recall"]) == (0.5, 0.5)
    # AUROC: good scores {0.9, 0.4, 0.8} vs bad {0.2, 0.7}: 5 of 6 pairs ordered right (not 0.4 > 0.7).
    assert figures["auroc"] == pytest.approx(5 / 6)
    # ECE, 10 bins: bins 2 (0.2, bad), 4 (0.4, good), 7 (0.7, bad), 8 (0.8, good), 9 (0.9, good).
    assert figures["ece"] == pytest.approx((0.2 + 0.6 + 0.7 + 0.2 + 0.1) / 5)


def test_best_of_n_hand_computed_with_ties_and_unscored_groups():
    def cand(group, correct, answer, minimum):
        return {"group": group, "correct": correct, "answer": answer, "aggregates": {"min": minimum, "last": 0.5}}

    records = [
        cand("g1", False, "3", 0.2), cand("g1", True, "4", 0.9), cand("g1", False, "3", 0.1),
        cand("g2", True, "7", 0.6), cand("g2", False, "8", 0.6),  # tie on min
        cand("g3", False, "1", None), cand("g3", True, "2", None),  # unscored by min
    ]
    # Default: the expected accuracy under uniform random tie-breaking.
    result = benchmarks.best_of_n(records)
    assert result["groups"] == 3 and result["tie_break"] == "expected"
    assert result["prm_accuracy"]["min"] == pytest.approx((1 + 0.5 + 0) / 3)  # g2: one of two tied is right
    assert result["unscored_groups"]["min"] == 1
    assert result["prm_accuracy"]["last"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)  # all tie on last
    assert result["accuracy"] == result["prm_accuracy"]["min"]
    # Majority: g1 "3" (wrong), g2 "7" vs "8" (one of two right), g3 "1" vs "2" (one of two right).
    assert result["majority_vote_accuracy"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    # PRM-weighted vote by min: g1 "3" 0.2 + 0.1 = 0.3 < "4" 0.9 (right), g2 0.6 vs 0.6, g3 unscored.
    assert result["weighted_vote_accuracy"]["min"] == pytest.approx((1 + 0.5 + 0) / 3)
    # "last": g1 "3" 0.5 + 0.5 = 1.0 beats "4" 0.5 (wrong), g2 and g3 tie.
    assert result["weighted_vote_accuracy"]["last"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert result["pass_at_n"] == 1.0

    first = benchmarks.best_of_n(records, tie_break="first")  # the first-seen candidate or answer
    assert first["prm_accuracy"]["min"] == pytest.approx(2 / 3)  # g1 right, g2 right (first), g3 counted wrong
    assert first["prm_accuracy"]["last"] == pytest.approx(1 / 3)  # first candidates: only g2's is right
    assert first["majority_vote_accuracy"] == pytest.approx(1 / 3)  # g2 "7" first seen (right), g3 "1" (wrong)
    assert first["weighted_vote_accuracy"]["min"] == pytest.approx(2 / 3)
    with pytest.raises(ScoresError, match="'group': is missing"):
        benchmarks.best_of_n([{"correct": True}])


def test_processbench_oracles_on_real_gsm8k(shared_data):
    with gzip.open(shared_data / "processbench" / "gsm8k.json.gz", "rt") as handle:
        items = json.load(handle)
    oracle = [pb("gsm8k", [0.0 if item["label"] != -1 and i >= item["label"] else 1.0
                           for i in range(len(item["steps"]))], item["label"]) for item in items]
    assert benchmarks.processbench(oracle)["average_f1"] == 1.0
    always_correct = [pb("gsm8k", [1.0] * len(item["steps"]), item["label"]) for item in items]
    assert benchmarks.processbench(always_correct)["average_f1"] == 0.0
    # Outcome-only oracle: only the last step is judged, wrong iff the final answer is wrong.
    outcome = [pb("gsm8k", [1.0] * (len(item["steps"]) - 1) + [0.0 if not item["final_answer_correct"] else 1.0],
                  item["label"]) for item in items]
    erroneous = [item for item in items if item["label"] != -1]
    correct = [item for item in items if item["label"] == -1]
    acc_err = sum(not item["final_answer_correct"] and item["label"] == len(item["steps"]) - 1
                  for item in erroneous) / len(erroneous)
    acc_cor = sum(item["final_answer_correct"] for item in correct) / len(correct)
    expected = 2 * acc_err * acc_cor / (acc_err + acc_cor)
    assert benchmarks.processbench(outcome)["average_f1"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0


@pytest.mark.one_leg
def test_converters_for_prmbench_and_best_of_n_and_the_evaluate_command(tmp_path):
    prmbench = write_jsonl(tmp_path / "prmbench.jsonl", [{
        "idx": 7, "classification": "counterfactual", "modified_question": "Q?",
        "modified_process": ["a", "b", "c"], "error_steps": [2], "original_process": ["x"]}])
    out = tmp_path / "prmbench-out.jsonl"
    run_cli(["convert-data", "--from", "prmbench", "--input", str(prmbench), "--output", str(out)])
    record = json.loads(out.read_text())
    assert record["labels"] == ["+", "-", "+"] and record["responses"] == ["a", "b", "c"] and record["idx"] == 7

    grouped = write_jsonl(tmp_path / "bon.jsonl", [{"id": "p1", "problem": "2+2?", "candidates": [
        {"steps": ["2+2=4", "so 4"], "answer": "4", "correct": True},
        {"steps": ["2+2=5"], "answer": "5", "correct": False}]}])
    out = tmp_path / "bon-out.jsonl"
    run_cli(["convert-data", "--from", "best-of-n", "--input", str(grouped), "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["group"], r["answer"], r["correct"], len(r["responses"])) for r in rows] == [
        ("p1", "4", True, 2), ("p1", "5", False, 1)]
    assert all("labels" not in r for r in rows)

    scores = write_jsonl(tmp_path / "scores.jsonl", [
        {**rows[0], "aggregates": {"min": 0.3}}, {**rows[1], "aggregates": {"min": 0.8}}])
    result = run_cli(["evaluate", "--scores", str(scores), "--benchmark", "best-of-n"])
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "best-of-n" and last["accuracy"] == 0.0 and last["pass_at_n"] == 1.0
    refused = run_cli(["evaluate", "--scores", str(scores), "--benchmark", "processbench"], check=False)
    assert refused.returncode == 2 and "record 0 (line 1), field 'step_scores': is missing" in refused.stderr


@pytest.mark.one_leg
def test_quick_demo_scores_and_evaluates_its_held_out_set(tmp_path):
    result = run_cli(["demo", "--quick", "--output-dir", str(tmp_path)])
    # Quiet output that ends with the learned figures (all of them also in summary.json).
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) < 40, "\n".join(lines)
    assert result.stdout.strip().splitlines()[-6:][0].startswith("held-out figures after 20 steps")
    summary = json.loads((tmp_path / "summary.json").read_text())
    figures = {line.split()[0]: line for line in result.stdout.strip().splitlines()[-4:]}
    assert figures["step"].split()[-2:] == [f"{summary['step_accuracy']:.4f}", f"{summary['majority_step_accuracy']:.4f}"]
    assert figures["AUROC"].split()[-1] == f"{summary['auroc']:.4f}"
    # Scoring the saved checkpoint reproduces the training run's own evaluation.
    assert summary["scored_step_accuracy"] == summary["step_accuracy"]
    assert summary["scored_processbench_f1"] == summary["first_error_f1"]
    scored = [json.loads(line) for line in (tmp_path / "dev_scores.jsonl").read_text().splitlines()]
    assert len(scored) == summary["eval_records"]
    assert all(len(r["step_scores"]) == len(r["labels"]) and set(r["aggregates"]) == {"min", "last", "prod", "mean"}
               for r in scored)
    first = scored[0]
    assert first["aggregates"]["min"] == min(first["step_scores"])
    assert first["aggregates"]["last"] == first["step_scores"][-1]
    evaluated = run_cli(["evaluate", "--scores", str(tmp_path / "dev_scores.jsonl"), "--benchmark", "steps"])
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(
        summary["step_accuracy"], abs=1e-4)

    refused = run_cli(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data" / "dev.jsonl"),
                       "--output", str(tmp_path / "bad.jsonl"), "--aggregate", "min,median"], check=False)
    assert refused.returncode == 2 and "unknown aggregate(s) median" in refused.stderr
    assert not (tmp_path / "bad.jsonl").exists()

    # The same checkpoint scored under tensor parallelism (2 processes, unpacked rows) agrees.
    run_cli(["score", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data" / "dev.jsonl"),
             "--output", str(tmp_path / "tp2.jsonl"), "--no-packing", "--tensor_parallel_degree", "2",
             "--device", "cpu"], nproc=2)
    tp2 = [json.loads(line) for line in (tmp_path / "tp2.jsonl").read_text().splitlines()]
    assert [r["index"] for r in tp2] == [r["index"] for r in scored]
    worst = max(abs(a - b) for r1, r2 in zip(scored, tp2) for a, b in zip(r1["step_scores"], r2["step_scores"]))
    assert worst < 1e-5


@pytest.mark.parametrize("benchmark, record, field", [
    ("steps", {"labels": ["+", "-"], "step_scores": [0.2, float("nan")]}, "step_scores[1]"),
    ("prmbench", {"labels": ["+"], "step_scores": [-0.1]}, "step_scores[0]"),
    ("processbench", {"first_error": -1, "step_scores": [float("inf")]}, "step_scores[0]"),
    ("best-of-n", {"group": "g", "correct": True, "aggregates": {"min": 1.5}}, "aggregates.min"),
    ("steps", {"labels": ["+", 2], "step_scores": [0.2, 0.3]}, "labels[1]"),
])
def test_scores_that_are_not_probabilities_are_refused_naming_the_record(benchmark, record, field):
    function = {"steps": benchmarks.steps, "prmbench": benchmarks.prmbench, "processbench": benchmarks.processbench,
                "best-of-n": benchmarks.best_of_n}[benchmark]
    good = {"labels": ["+"], "step_scores": [0.5], "first_error": -1, "group": "g", "correct": False,
            "aggregates": {"min": 0.5}}
    with pytest.raises(ScoresError, match=re.escape(f"<records>: record 1, field '{field}'") + ".*finite number in"):
        function([good, record])


def test_evaluate_refuses_bad_scores_and_thresholds_with_one_line(tmp_path):
    scores = write_jsonl(tmp_path / "scores.jsonl", [{"labels": ["+"], "step_scores": [0.7]},
                                                     {"labels": ["+", "-"], "step_scores": [0.7, 1.5]}])
    refused = run_cli(["evaluate", "--scores", str(scores), "--benchmark", "steps"], check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (f"{scores}: record 1 (line 2), field 'step_scores[1]': 1.5 is not a probability"
            in refused.stderr.strip().splitlines()[-1])
    for threshold in ("nan", "1.5"):
        with pytest.raises(ScoresError, match="threshold must be a finite number in \\[0, 1\\]"):
            benchmarks.steps([{"labels": ["+"], "step_scores": [0.7]}], float(threshold))
