"""PRMBench: ``convert-data`` + ``evaluate`` give exactly the official scorer's PRMScore and per-class
figures on the 422 real rows of ../shared/data/prmbench (27 of them name an error step past the end),
with deterministic synthetic step scores that tie the 0.5 threshold often."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import zlib

import pytest

from conftest import run_cli, write_jsonl
from megatron_prm import benchmarks, metrics
from megatron_prm.data.convert import convert_file

SAMPLE = "prmbench/prmbench_train_p1_sample.jsonl.gz"
THRESHOLD = 0.5  # the official validity_threshold of PRMs (mr_eval/models/*.py)


# ---- The official scorer, ported line by line from ssmisya/PRMBench @ cc7db59,
# ---- mr_eval/tasks/prmtest_classified/task.py (load_data_function, evaluate_function,
# ---- eval_on_hallucination_step); logging, the similarity metric and the "validity" filter of API models
# ---- are left out (they do not touch the F1 counts). PRMScore as mr_visualize/eval_res_view/draw_tabs/
# ---- form_latex_strs.ipynb computes it.

def official_load_data_function(raw_data):
    meta_data = []
    correct_sample_classification = "redundency"
    filter_dict = {}
    for idx, item in enumerate(raw_data):
        item_idx = item["idx"]
        question = item["modified_question"]
        steps = item["modified_process"]
        error_steps = item["error_steps"]
        classification = item["classification"]

        if classification == correct_sample_classification:
            correct_idx = f"correct_{item_idx}"
            if filter_dict.get(correct_idx) is None:
                correct_sample = dict(
                    idx=correct_idx,
                    question=item["original_question"],
                    steps=item["original_process"],
                    error_steps=[],
                    classification="correct"
                )
                meta_data.append(correct_sample)
                filter_dict[correct_idx] = 1
        classification_idx = f"{classification}_{item_idx}"
        if filter_dict.get(classification_idx) is None:
            res = dict(idx=classification_idx, question=question, steps=steps, error_steps=error_steps,
                       classification=classification)
            meta_data.append(res)
            filter_dict[classification_idx] = 1
    return meta_data


def official_eval_on_hallucination_step(hallucination_steps, labels, redundency_label=False):
    ## Important: hallucination_steps are 0-indexed
    hallucination_steps = [i - 1 for i in hallucination_steps]
    if redundency_label:
        POSITIVE_LABEL = 0
        NEGATIVE_LABEL = 1
    else:
        POSITIVE_LABEL = 1
        NEGATIVE_LABEL = 0
    TP = 0
    FP = 0
    TN = 0
    FN = 0
    first_error_location = min(hallucination_steps) if len(hallucination_steps) > 0 else -1
    first_error_acc = None
    for idx in range(len(labels)):
        if idx == first_error_location:
            if labels[idx] == NEGATIVE_LABEL:
                first_error_acc = 1
            else:
                first_error_acc = 0
        if idx in hallucination_steps:
            if labels[idx] == POSITIVE_LABEL:
                FP += 1
            else:
                TN += 1
        else:
            if labels[idx] == POSITIVE_LABEL:
                TP += 1
            else:
                FN += 1
    return dict(f1_matrix=dict(TP=TP, FP=FP, TN=TN, FN=FN), first_error_acc=first_error_acc)


def official_f1s(TP, FP, TN, FN):
    precision = TP / (TP + FP) if (TP + FP) != 0 else -1
    recall = TP / (TP + FN) if (TP + FN) != 0 else -1
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) != 0 else -1
    negative_precision = TN / (TN + FN) if (TN + FN) != 0 else -1
    negative_recall = TN / (TN + FP) if (TN + FP) != 0 else -1
    negative_f1 = (2 * negative_precision * negative_recall / (negative_precision + negative_recall)
                   if (negative_precision + negative_recall) != 0 else -1)
    return f1, negative_f1


def official_evaluate_function(results, meta_data):
    meta_data_dict = {meta["idx"]: meta for meta in meta_data}
    classification_types = set([meta["classification"] for meta in meta_data])
    halucination_specified_dict = {"f1_matrix": {i: dict(TP=0, FP=0, TN=0, FN=0) for i in classification_types}}
    total_metric_lists = {"f1_matrix": dict(TP=0, FP=0, TN=0, FN=0)}
    filtered_dict = {}
    filtered_results = []
    for result in results:
        idx = result["idx"]
        if filtered_dict.get(idx) is None and meta_data_dict.get(idx) is not None:
            filtered_dict[idx] = 1
            filtered_results.append(result)
    correct_ids_dict = {meta["idx"]: 1 for meta in meta_data if meta["classification"] == "correct"}
    correct_predictions = [prediction for prediction in filtered_results if prediction["idx"] in correct_ids_dict]
    other_predictions = [prediction for prediction in filtered_results if prediction["idx"] not in correct_ids_dict]
    for prediction in correct_predictions:
        reference_item = meta_data_dict[prediction["idx"]]
        labels = prediction["scores"]["step_level_validity_labels"]
        res_dict = official_eval_on_hallucination_step(reference_item["error_steps"], labels)
        for key in ("TP", "FP", "TN", "FN"):
            halucination_specified_dict["f1_matrix"][reference_item["classification"]][key] += res_dict["f1_matrix"][key]
    for prediction in other_predictions:
        reference_item = meta_data_dict[prediction["idx"]]
        error_steps = reference_item["error_steps"]
        classifcation = reference_item["classification"]
        # Our PRM has no step_level_redundancy_labels head: the official fallback to the validity labels.
        labels = prediction["scores"]["step_level_validity_labels"]
        res_dict = official_eval_on_hallucination_step(error_steps, labels, redundency_label=False)
        for key in ("TP", "FP", "TN", "FN"):
            halucination_specified_dict["f1_matrix"][classifcation][key] += res_dict["f1_matrix"][key]
            total_metric_lists["f1_matrix"][key] += res_dict["f1_matrix"][key]
    total = official_f1s(**total_metric_lists["f1_matrix"])
    per_class = {c: official_f1s(**halucination_specified_dict["f1_matrix"][c]) for c in classification_types}
    return total, per_class


def official_prm_score(f1, negative_f1, classification=None):
    # mr_visualize/eval_res_view/draw_tabs/form_latex_strs.ipynb, get_prmscore_from_current_res_dict
    if classification in ["multi_solutions"]:
        prm_score = f1
    else:
        prm_score = f1 * 0.5 + negative_f1 * 0.5
    prm_score = prm_score if prm_score > 0 else 0
    return prm_score


# ---- the test

def synthetic_scores(key: str, steps: int, error_steps: list[int]) -> list[float]:
    """Deterministic P(good) per step, better than chance and exactly 0.5 often: error steps draw from
    {0, 0.05, ..., 0.5}, other steps from {0.25, ..., 0.75}."""
    scores = []
    for step in range(steps):
        draw = zlib.crc32(f"{key}/{step}".encode()) % 11
        scores.append(draw / 20 if step + 1 in error_steps else (draw + 5) / 20)
    return scores


@pytest.fixture(scope="module")
def prmbench_rows(shared_data):
    with gzip.open(shared_data / SAMPLE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == 422
    assert sum(any(e > len(r["modified_process"]) for e in r["error_steps"]) for r in rows) == 27
    return rows


def scored_records(converted: list[dict]) -> list[dict]:
    """What ``score`` writes for the converted records: their fields, less the texts, plus step scores."""
    return [{**{k: v for k, v in record.items() if k not in ("src", "tgt", "responses")},
             "step_scores": synthetic_scores(f"{record['classification']}_{record['idx']}", len(record["responses"]),
                                             record["error_steps"])} for record in converted]


def test_prmbench_equals_the_official_scorer_on_every_real_row(prmbench_rows, shared_data, tmp_path):
    out = tmp_path / "prmbench.jsonl"
    report = convert_file("prmbench", shared_data / SAMPLE, out, show_progress=False)
    converted = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    meta_data = official_load_data_function(prmbench_rows)
    assert report.read == 422 and report.converted == len(meta_data) == 422 + 53  # + one correct row per redundency
    assert [f"{r['classification']}_{r['idx']}" for r in converted] == [m["idx"] for m in meta_data]

    records = scored_records(converted)
    ours = benchmarks.prmbench(records)
    results = [{"idx": f"{r['classification']}_{r['idx']}",
                "scores": {"step_level_validity_labels": [p > THRESHOLD for p in r["step_scores"]]}} for r in records]
    (total_f1, total_negative_f1), per_class = official_evaluate_function(results, meta_data)

    assert ours["prmbench_score"] == official_prm_score(total_f1, total_negative_f1)
    assert (ours["f1_correct"], ours["f1_erroneous"]) == (total_f1, total_negative_f1)
    assert set(ours["classes"]) == set(per_class) and len(per_class) == 9  # 8 error classes + correct
    for name, (f1, negative_f1) in per_class.items():  # "correct" too: its F1 of error steps is 0 (-0.0 there)
        mine = ours["classes"][name]
        assert (mine["f1_correct"], mine["f1_erroneous"]) == (f1, negative_f1), name
        assert mine["prmbench_score"] == official_prm_score(f1, negative_f1, name), name

    # The same figures from the command line, on the scores file.
    scores = write_jsonl(tmp_path / "scores.jsonl", records)
    result = run_cli(["evaluate", "--scores", str(scores), "--benchmark", "prmbench"])
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["prmbench_score"] == ours["prmbench_score"] and printed["classes"] == ours["classes"]
    assert "counterfactual" in result.stderr and "PRMScore" in result.stderr

    # The rule matters on these scores: P(good) == 0.5 is invalid for the official scorer, valid under ge.
    inclusive = benchmarks.prmbench(records, rule="ge")
    assert inclusive["prmbench_score"] != ours["prmbench_score"]


def test_out_of_range_error_steps_keep_the_row(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", [{
        "idx": "x1", "classification": "deception", "original_question": "Q", "modified_question": "Q'",
        "original_process": ["a", "b"], "modified_process": ["a", "c"], "error_steps": [2, 5]}])
    out = tmp_path / "out.jsonl"
    assert convert_file("prmbench", path, out, show_progress=False).converted == 1
    record = json.loads(out.read_text())
    assert record["labels"] == ["+", "-"] and record["error_steps"] == [2, 5]
    figures = benchmarks.prmbench([{**record, "step_scores": [0.9, 0.2]}])
    assert (figures["tp"], figures["tn"], figures["fp"], figures["fn"]) == (1, 1, 0, 0)
    assert figures["prmbench_score"] == 1.0


@pytest.mark.parametrize("classification", ["deception", "multi_solutions"])
def test_degenerate_counts_give_the_official_sentinels_and_prmscore(classification):
    """Every confusion with counts 0..2 (81 of them, the empty class and every class without a true
    positive among them): F1s, their -1 / -0.0 sentinels and the clamped PRMScore equal the official code's."""
    cases = 0
    for tp, fp, tn, fn in itertools.product(range(3), repeat=4):
        mine = metrics.Confusion(tp, fp, tn, fn).figures(classification)
        f1, negative_f1 = official_f1s(tp, fp, tn, fn)
        assert (mine["f1_correct"], mine["f1_erroneous"]) == (f1, negative_f1), (tp, fp, tn, fn)
        assert math.copysign(1, mine["f1_correct"]) == math.copysign(1, f1), (tp, fp, tn, fn)  # -0.0 too
        assert mine["prmbench_score"] == official_prm_score(f1, negative_f1, classification), (tp, fp, tn, fn)
        cases += 1
    assert cases == 81
    # Spelled out: no true positive with both error kinds present is -1, and PRMScore is clamped to 0.
    figures = metrics.Confusion(tp=0, fp=2, tn=3, fn=1).figures(classification)
    assert figures["f1_correct"] == -1 and figures["prmbench_score"] == 0


def test_the_report_table_prints_a_sentinel_as_a_dash():
    from megatron_prm.cli import _prmbench_table

    figures = metrics.prmbench_figures([("deception", [0.2, 0.9], [2])], 0.5)
    assert (figures["f1_correct"], figures["f1_erroneous"]) == (-1, -1)
    row = next(line for line in _prmbench_table(figures).splitlines() if line.startswith("deception"))
    assert row.split() == ["deception", "0.0", "-", "-", "2"]
