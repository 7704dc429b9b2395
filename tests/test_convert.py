"""Converters of Math-Shepherd, ProcessBench and PRM800K, on inline samples and the shared data."""

import gzip
import json

import pytest

from conftest import MISTRAL, run_cli, write_jsonl
from megatron_prm.data.convert import (
    FormatError, Skip, convert_file, convert_math_shepherd, convert_processbench, convert_prm800k,
)


def shepherd(question, steps, marks, task="GSM8K"):
    body = "\n".join(f"{s} ки" for s in steps)
    labelled = "\n".join(f"{s} {m}" for s, m in zip(steps, marks))
    return {"input": f"{question} {body}", "label": f"{question} {labelled}", "task": task}


def test_math_shepherd_steps_and_labels():
    raw = shepherd("Is 7 - 2 + 1 = 6? Answer +/- questions carefully.",
                   ["Step 1: 7 - 2 = 5", "Step 2: 5 + 1 = 7", "Step 3: The answer is: 7"], "+--")
    record = convert_math_shepherd(raw)
    assert record["src"] == "Is 7 - 2 + 1 = 6? Answer +/- questions carefully."
    assert record["responses"] == ["Step 1: 7 - 2 = 5", "Step 2: 5 + 1 = 7", "Step 3: The answer is: 7"]
    assert record["labels"] == ["+", "-", "-"] and record["task"] == "GSM8K"


@pytest.mark.parametrize("raw, reason", [
    (shepherd("What is ки?", ["Step 1: 1 + 1 = 2"], "+"), "question contains the step tag"),
    ({"input": "Q Step 1: a ки\nStep 2: b ки", "label": "Q Step 1: a +\nStep 2: b"},
     "step counts of input and label disagree"),
    ({"input": "Q Step 1: a ки\nStep 2: b ки", "label": "Q Step 1: a +\nStep 2: c -"},
     "label text does not line up with input"),
    ({"input": "Q Step 1: a ки", "label": "Q Step 1: a ?"}, "step counts of input and label disagree"),
    ({"input": "Q 1: a ки", "label": "Q 1: a +"}, "no 'Step 1:' in input"),
    ({"label": "x"}, "missing input"),
])
def test_math_shepherd_awkward_records_are_skipped(raw, reason):
    with pytest.raises(Skip, match=reason):
        convert_math_shepherd(raw)


def test_processbench_labels_and_metadata():
    raw = {"id": "gsm8k-3", "generator": "m", "problem": "p", "steps": ["a", "b", "c"],
           "final_answer_correct": False, "label": 1}
    record = convert_processbench(raw)
    assert record["labels"] == ["+", "-", "-"]
    assert (record["id"], record["first_error"], record["final_answer_correct"]) == ("gsm8k-3", 1, False)
    assert convert_processbench({**raw, "label": -1})["labels"] == ["+", "+", "+"]
    with pytest.raises(Skip, match="not -1 or a step index"):
        convert_processbench({**raw, "label": 3})


def prm800k(steps, finish="solution"):
    return {"question": {"problem": "P", "ground_truth_answer": "4"},
            "label": {"steps": steps, "finish_reason": finish}}


def step(ratings, chosen, human=None):
    return {"completions": [{"text": f"s{i} r{r}", "rating": r} for i, r in enumerate(ratings)],
            "chosen_completion": chosen, "human_completion": human}


def test_prm800k_follows_the_chosen_path_and_stops_at_the_first_bad_step():
    raw = prm800k([step([1], 0), step([-1, 0, 1], 2), step([0], 0), step([-1, 1], 0), step([1], 0)])
    record = convert_prm800k(raw)
    assert record["responses"] == ["s0 r1", "s2 r1", "s0 r0", "s0 r-1"]
    assert record["labels"] == ["+", "+", "+", "-"]
    assert record["ground_truth_answer"] == "4" and record["finish_reason"] == "solution"
    assert convert_prm800k(raw, "negative")["labels"] == ["+", "+", "-"]
    assert convert_prm800k(raw, "drop")["labels"] == ["+", "+"]


def test_prm800k_stops_before_a_step_without_a_chosen_completion():
    raw = prm800k([step([1], 0), step([-1, -1], None, {"text": "human", "rating": None}), step([1], 0)])
    assert convert_prm800k(raw)["responses"] == ["s0 r1"]
    with pytest.raises(Skip, match="no rated step"):
        convert_prm800k(prm800k([step([0, 0], None)]))


def test_wrong_format_is_a_clear_error_and_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "pb.jsonl", [{"id": "x", "problem": "p", "steps": ["a"], "label": -1}])
    with pytest.raises(FormatError, match="not math-shepherd data.*looks like processbench"):
        convert_file("math-shepherd", path, tmp_path / "out.jsonl", show_progress=False)
    assert list(tmp_path.iterdir()) == [path]


def test_convert_file_counts_skips_by_reason(tmp_path):
    good = shepherd("Q", ["Step 1: x"], "+")
    bad = shepherd("What is ки?", ["Step 1: x"], "+")
    path = write_jsonl(tmp_path / "ms.jsonl", [good, bad, good])
    report = convert_file("math-shepherd", path, tmp_path / "out.jsonl", show_progress=False)
    assert report.as_dict()["converted"] == 2
    assert report.as_dict()["skipped_by_reason"] == {"question contains the step tag": 1}
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def check_data(path):
    result = run_cli(["check-data", "--data", str(path), "--tokenizer", MISTRAL])
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_processbench_gsm8k_converts_and_passes_check_data(tmp_path, shared_data):
    source = shared_data / "processbench" / "gsm8k.json.gz"
    out = tmp_path / "pb.jsonl"
    result = run_cli(["convert-data", "--from", "processbench", "--input", str(source), "--output", str(out)])
    assert json.loads(result.stdout.strip().splitlines()[-1])["converted"] == 400
    with gzip.open(source, "rt") as handle:
        raw = json.load(handle)
    converted = [json.loads(line) for line in out.read_text().splitlines()]
    for original, record in zip(raw, converted):
        assert len(record["labels"]) == len(record["responses"]) == len(original["steps"])
        assert record["first_error"] == original["label"] and record["id"] == original["id"]
        first_bad = record["labels"].index("-") if "-" in record["labels"] else -1
        assert first_bad == original["label"]
    summary = check_data(out)
    assert summary["kept"] == 400 and summary["invalid"] == 0
    assert summary["labelled_positions"] == sum(len(r["steps"]) for r in raw)


def test_prm800k_example_converts_and_passes_check_data(tmp_path, shared_data):
    out = tmp_path / "prm800k.jsonl"
    report = convert_file("prm800k", shared_data / "prm800k" / "prm800k-phase1-train-example.json", out,
                          show_progress=False)
    assert report.read == 3
    converted = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(converted) == report.converted >= 1
    assert all(len(r["labels"]) == len(r["responses"]) for r in converted)
    summary = check_data(out)
    assert summary["kept"] == report.converted and summary["steps"] == report.steps
