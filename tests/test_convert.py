"""Converters of Math-Shepherd, ProcessBench and PRM800K, on inline samples and the shared data."""

import gzip
import json
import re

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


JANET = ("Janet pays $40/hour for 3 hours per week of clarinet lessons and $28/hour for 5 hours a week of piano "
         "lessons. How much more does she spend on piano lessons than clarinet lessons in a year?")
JANET_STEPS = ["Janet spends 3 hours + 5 hours = <<3+5=8>>8 hours per week on music lessons.",
               "She spends 40 * 3 = <<40*3=120>>120 on clarinet lessons per week.",
               "She spends 28 * 5 = <<28*5=140>>140 on piano lessons per week."]


@pytest.mark.parametrize("prefix", ["step {}: ", ""])
def test_math_shepherd_rows_with_lowercase_or_no_step_markers_are_recovered_as_trl_did(prefix):
    """TRL's former huggingface/trl examples/datasets/math_shepherd.py: the first step starts at "Step 1:",
    else at "step 1:", else right after the question's "?"."""
    steps = [prefix.format(i + 1) + text for i, text in enumerate(JANET_STEPS)]
    record = convert_math_shepherd(shepherd(JANET, steps, "++-"))
    assert record["src"] == JANET and record["responses"] == steps and record["labels"] == ["+", "+", "-"]
    if prefix:  # the lowercase marker alone places the first step, whatever the question's "?"s
        record = convert_math_shepherd(shepherd("Why? " + JANET, steps, "+-+"))
        assert record["src"] == "Why? " + JANET and record["responses"] == steps
    with pytest.raises(Skip, match="question contains the step tag"):  # a stray tag before "Step 1:"
        convert_math_shepherd({"input": "Q ки Step 1: a ки", "label": "Q + Step 1: a +"})


@pytest.mark.parametrize("raw, reason", [
    (shepherd("What is ки?", ["Step 1: 1 + 1 = 2"], "+"), "question contains the step tag"),
    ({"input": "Q Step 1: a ки\nStep 2: b ки", "label": "Q Step 1: a +\nStep 2: b"},
     "step counts of input and label disagree"),
    ({"input": "Q Step 1: a ки\nStep 2: b ки", "label": "Q Step 1: a +\nStep 2: c -"},
     "label text does not line up with input"),
    ({"input": "Q Step 1: a ки", "label": "Q Step 1: a ?"}, "step counts of input and label disagree"),
    ({"input": "Q 1: a ки", "label": "Q 1: a +"}, "no 'Step 1:' and not exactly one '?'"),
    ({"input": "Q? Or? a ки", "label": "Q? Or? a +"}, "no 'Step 1:' and not exactly one '?'"),
    (shepherd("Round to the nearest ten: 14?", ["1 ки 0"], "+"), "question contains the step tag"),
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


def test_prm800k_phase1_human_completion_is_on_the_path():
    human = {"text": "my own step", "rating": None, "source": "human", "flagged": False}
    raw = prm800k([step([1], 0), step([-1, -1], None, human), step([1], 0), step([None, None], None)])
    record = convert_prm800k(raw)
    assert record["responses"] == ["s0 r1", "my own step", "s0 r1"]  # ends where nothing was chosen
    assert record["labels"] == ["+", "+", "+"]
    with pytest.raises(Skip, match="no rated step"):
        convert_prm800k(prm800k([step([0, 0], None)]))


def test_prm800k_phase2_first_error_step_is_kept_and_ends_the_solution():
    raw = prm800k([step([1], 0), step([-1, 0, 1], None), step([1], 0)], finish="found_error")
    raw["question"]["pre_generated_steps"] = ["s0 r1", "s0 r-1", "s0 r1"]
    record = convert_prm800k(raw)
    assert record["responses"] == ["s0 r1", "s0 r-1"] and record["labels"] == ["+", "-"]


def test_prm800k_chosen_index_true_is_not_an_index(tmp_path):
    raw = prm800k([step([1], 0), step([1, -1], True)])  # JSON true was taken as completion 1
    reason = "label.steps[].chosen_completion: expected an integer >= 0, got true/false"
    with pytest.raises(Skip, match=re.escape(reason)):
        convert_prm800k(raw)
    path = write_jsonl(tmp_path / "p.jsonl", [raw, prm800k([step([1], 0)])])
    report = convert_file("prm800k", path, tmp_path / "out.jsonl", show_progress=False).as_dict()
    assert report["converted"] == 1 and report["skipped_by_reason"] == {reason: 1}
    assert report["first_skipped_by_reason"] == {
        reason: f"{path}: record 0 (line 1), field 'label.steps[1].chosen_completion': expected an integer >= 0, got true"}


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


@pytest.mark.one_leg
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


def in_process(capsys, argv: list[str]) -> tuple[dict, str]:
    """Run the command in this process: its last JSON line and what it printed to stderr."""
    from megatron_prm.cli import main

    assert main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_prm800k_real_rows_of_both_phases_convert_by_the_readme(tmp_path, shared_data, capsys):
    # Phase 1 (three real trajectories): human-written steps stay on the path, every step is kept.
    out = tmp_path / "prm800k.jsonl"
    summary, stderr = in_process(capsys, ["convert-data", "--from", "prm800k", "--input",
                                          str(shared_data / "prm800k" / "prm800k-phase1-train-example.json"),
                                          "--output", str(out)])
    converted = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["read"] == summary["converted"] == 3
    assert [len(r["responses"]) for r in converted] == [6, 29, 6]
    assert converted[0]["responses"][1] == "We have $3p+e=1.24$ and $5p+e=1.82$."  # the labeller's own step
    assert summary["label_counts"] == {"good": 41, "bad": 0} and "41 '+', 0 '-'" in stderr
    checked, stderr = in_process(capsys, ["check-data", "--data", str(out), "--tokenizer", MISTRAL])
    assert "41 good, 0 bad, 0 soft" in stderr
    assert checked["kept"] == 3 and checked["label_counts"] == {"good": 41, "bad": 0, "soft": 0}

    # Phase 2 (the README's annotated found_error record): the rated -1 step with chosen_completion null is
    # completions[0], the pre-generated third step, and the solution's one '-' label.
    source = shared_data / "prm800k" / "prm800k-phase2-readme-example.json"
    raw = json.loads(source.read_text())
    record = convert_prm800k(raw)
    assert record["responses"] == raw["question"]["pre_generated_steps"][:3]
    assert record["labels"] == ["+", "+", "-"] and record["finish_reason"] == "found_error"
    with pytest.raises(Skip, match="no rated step"):
        convert_prm800k(raw, "drop")  # both earlier steps are rated 0: dropping ends the solution at once
    assert convert_prm800k(raw, "negative")["labels"] == ["-"]
    out2 = tmp_path / "phase2.jsonl"
    summary, _ = in_process(capsys, ["convert-data", "--from", "prm800k", "--input", str(source), "--output", str(out2)])
    assert summary["label_counts"] == {"good": 2, "bad": 1}
    checked, _ = in_process(capsys, ["check-data", "--data", str(out2), "--tokenizer", MISTRAL])
    assert checked["label_counts"] == {"good": 2, "bad": 1, "soft": 0}
