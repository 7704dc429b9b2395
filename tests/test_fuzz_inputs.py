"""Property tests of bad input (issue 27), with a seeded generator of random JSON values: every field of
every source format and of the project's records, replaced or removed at random, gives a clean result
(converted, skipped and counted, or one error naming the record) and never a traceback; no converter
writes a record that check-data refuses; no input file changes."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Iterator

import pytest

from megatron_prm import benchmarks, cli
from megatron_prm.data.convert import FORMATS, convert_file
from megatron_prm.data.records import RecordError, iter_raw_records
from megatron_prm.data.samples import SampleOptions, load_samples
from megatron_prm.metrics import ScoresError
from megatron_prm.tokenizer import special_token_ids

CASES_PER_FORMAT = 60
SEED = 27

BASES = {
    "math-shepherd": {"input": "Q? Step 1: 1 + 1 = 2 ки\nStep 2: so 2 ки", "label": "Q? Step 1: 1 + 1 = 2 +\nStep 2: so 2 -",
                      "task": "GSM8K"},
    "processbench": {"id": "gsm8k-0", "generator": "m", "problem": "1 + 1?", "steps": ["1 + 1 = 2", "so 2"], "label": 1,
                     "final_answer_correct": False},
    "prm800k": {"question": {"problem": "P", "ground_truth_answer": "4", "pre_generated_steps": ["a", "b"]},
                "label": {"steps": [
                    {"completions": [{"text": "s0", "rating": 1}], "chosen_completion": 0, "human_completion": None},
                    {"completions": [{"text": "s1", "rating": 0}, {"text": "t1", "rating": -1}], "chosen_completion": None,
                     "human_completion": {"text": "h1", "rating": None}},
                    {"completions": [{"text": "s2", "rating": -1}], "chosen_completion": 0, "human_completion": None},
                ], "finish_reason": "found_error"}},
    "prmbench": {"idx": 3, "classification": "redundency", "modified_question": "Q", "modified_process": ["a", "b", "c"],
                 "error_steps": [2], "original_question": "Q", "original_process": ["a", "c"]},
    "best-of-n": {"id": "g0", "problem": "P", "candidates": [{"steps": ["a", "b"], "answer": "4", "correct": True},
                                                              {"steps": ["c"], "answer": "5", "correct": False}]},
}
RECORD_BASE = {"src": ["q1", "q2"], "tgt": ["a1"], "responses": ["s1", "s2"], "labels": ["+", 0.25], "id": "x-1"}
SCORES_BASE = {"id": "gsm8k-1", "label": 1, "first_error": 1, "labels": ["+", "-"], "step_scores": [0.9, 0.1],
               "group": "g", "answer": "4", "correct": True, "classification": "redundency", "idx": 1,
               "error_steps": [2], "num_steps": 2, "aggregates": {"min": 0.1}}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: the awkward scalars, and lists / objects nested up to three levels."""
    scalars = [None, True, False, 0, 1, -1, 2, 7, -(2 ** 70), 10 ** 400, 0.5, -0.0, 1e308, 1.5, "", " ", "x", "+", "-",
               "ки", "Step 1: a ки", "\ud800", "\udfff x", "a\u0000b", "ü" * 3]
    kind = rng.random()
    if depth >= 3 or kind < 0.6:
        return rng.choice(scalars)
    if kind < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["text", "rating", "steps", "a", "\ud800"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every field and item of ``value``, as key paths."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield (*prefix, i)
            yield from paths(child, (*prefix, i))


def mutate(base: dict, rng: random.Random) -> dict:
    """``base`` with one to three of its fields replaced by random values or removed."""
    record = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        options = list(paths(record))
        if not options:
            break
        *parent_path, last = rng.choice(options)
        parent = record
        for key in parent_path:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[last]
        else:
            parent[last] = random_value(rng)
    return record


def write_lines(path: Path, records: list) -> Path:
    """JSONL (``ensure_ascii``: a lone surrogate is written as its escape, as JSON may spell it), with an
    unreadable line or two among them."""
    lines = [json.dumps(record) for record in records]
    lines.insert(len(lines) // 2, '{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    lines.insert(len(lines) // 3, "[" + "9" * 5000 + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def special(mistral_tokenizer):
    return special_token_ids(mistral_tokenizer, "ки", ["+", "-"])


@pytest.mark.parametrize("source_format", FORMATS)
def test_random_fields_of_every_source_format(tmp_path, source_format, mistral_tokenizer, special):
    rng = random.Random(f"{SEED}-{source_format}")
    base = BASES[source_format]
    records = [base] + [mutate(base, rng) for _ in range(CASES_PER_FORMAT)]
    source = write_lines(tmp_path / "in.jsonl", records)
    before = source.read_bytes()
    output = tmp_path / "out.jsonl"
    report = convert_file(source_format, source, output, show_progress=False).as_dict()
    assert source.read_bytes() == before
    assert report["read"] == len(records) + 2 and report["converted"] >= 1
    assert report["skipped"] >= 2 + 1  # the unreadable lines, and at least one broken record
    # Every written record passes check-data's own validation and tokenization.
    samples, data = load_samples(output, mistral_tokenizer, special, SampleOptions(256, 128), ("+", "-"),
                                 require_labels=source_format != "best-of-n", show_progress=False)
    assert data.invalid == 0 and data.records == report["converted"]
    assert len(list(iter_raw_records(output))) == sum(1 for _ in output.open())


def test_random_fields_of_the_project_records(tmp_path, mistral_tokenizer, special):
    rng = random.Random(f"{SEED}-records")
    records = [RECORD_BASE] + [mutate(RECORD_BASE, rng) for _ in range(150)]
    path = write_lines(tmp_path / "records.jsonl", records)
    before = path.read_bytes()
    samples, report = load_samples(path, mistral_tokenizer, special, SampleOptions(256, 128), ("+", "-"),
                                   skip_invalid=True, show_progress=False)
    assert report.records == len(records) + 2 and report.invalid >= 2 and len(samples) >= 1
    # Without skip_invalid: the first bad record is one RecordError naming its record, never another error.
    with pytest.raises(RecordError, match=r"record \d+"):
        load_samples(path, mistral_tokenizer, special, SampleOptions(256, 128), ("+", "-"), show_progress=False)
    assert path.read_bytes() == before


@pytest.mark.parametrize("benchmark", ["processbench", "prmbench", "steps", "best-of-n"])
def test_random_fields_of_a_scores_file(tmp_path, benchmark, capsys):
    rng = random.Random(f"{SEED}-scores-{benchmark}")
    outcomes = set()
    for case in range(20):
        records = [SCORES_BASE, mutate(SCORES_BASE, rng), SCORES_BASE]
        path = write_lines(tmp_path / f"scores{case}.jsonl", records) if case % 5 == 0 else \
            tmp_path / f"scores{case}.jsonl"
        if case % 5:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        code = cli.main(["evaluate", "--scores", str(path), "--benchmark", benchmark])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, err[-2000:]
        if code == 2:
            assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
        outcomes.add(code)
    assert outcomes == {0, 2}


def test_the_scores_reader_names_a_record_for_every_random_value(tmp_path):
    rng = random.Random(f"{SEED}-scored")
    for _ in range(200):
        scored = benchmarks.ScoredRecords.of([mutate(SCORES_BASE, rng)])
        try:
            scored.step_scores(0)
            scored.labels_good(0)
        except ScoresError as err:
            assert "record 0" in str(err)
