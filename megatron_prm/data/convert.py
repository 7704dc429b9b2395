"""Public PRM data sets -> records of this project's format ``{src, tgt, responses, labels, ...}``.

Each converter takes one raw record and returns a converted record, or raises :class:`Skip` with the
reason; :func:`convert_file` streams a file through one of them, counts what was converted and what was
skipped (by reason), and writes JSONL under a temporary name that is renamed when complete.

- Math-Shepherd ``{input, label, task}``: ``input`` is the question, then steps ``"Step 1: ... ки"``;
  ``label`` is the same text with every ``ки`` replaced by ``+`` or ``-``. ``ки`` is two characters and
  its label one, so the k-th tag at offset ``p`` in ``input`` has its label at ``p - k`` in ``label``;
  the text around the tags must agree. A record whose question contains the tag, whose label text does
  not line up with the input, or whose tag count differs from its label count is skipped, never
  mislabelled.
- ProcessBench ``{id, generator, problem, steps, final_answer_correct, label}``: ``label`` is the index
  of the first wrong step (-1: none). Steps before it are ``+``, it and later ones ``-``. ``id`` and the
  first-error index are kept for evaluation.
- PRM800K ``{question, label: {steps: [{completions: [{text, rating}], chosen_completion,
  human_completion}]}}``: the solution follows each step's chosen completion; rating +1 is ``+``, -1 is
  ``-``, 0 follows ``neutral`` (positive, negative, or drop: the solution ends before the step). The
  solution ends after the first ``-`` step, or before a step without a chosen completion (where the
  labeller wrote their own, unrated, step).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_prm.data.records import iter_raw_records
from megatron_prm.progress import progress

STEP_TAG = "ки"
FORMATS = ("math-shepherd", "processbench", "prm800k", "prmbench", "best-of-n")
NEUTRAL_CHOICES = ("positive", "negative", "drop")
# Keys whose absence in the first record means the file is of another format.
_SIGNATURE = {
    "math-shepherd": ("input", "label"),
    "processbench": ("problem", "steps", "label"),
    "prm800k": ("question", "label"),
    "prmbench": ("modified_question", "modified_process", "error_steps"),
    "best-of-n": ("id", "problem", "candidates"),
}


class Skip(Exception):
    """A record that cannot be converted faithfully; the message is the reason counted."""


class FormatError(ValueError):
    """The input file is not of the format that was named."""


def _require(raw: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(raw, dict):
        raise Skip("not a JSON object")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise Skip(f"missing {', '.join(missing)}")


def convert_math_shepherd(raw: dict) -> dict:
    _require(raw, ("input", "label"))
    text, labelled = raw["input"], raw["label"]
    if not isinstance(text, str) or not isinstance(labelled, str):
        raise Skip("input or label is not a string")
    start = text.find("Step 1:")
    if start < 0:
        raise Skip("no 'Step 1:' in input")
    question = text[:start].strip()
    if STEP_TAG in question:
        raise Skip("question contains the step tag")
    if labelled[:start] != text[:start]:
        raise Skip("label text does not line up with input")
    tag_offsets = []
    at = text.find(STEP_TAG, start)
    while at >= 0:
        tag_offsets.append(at)
        at = text.find(STEP_TAG, at + len(STEP_TAG))
    if not tag_offsets:
        raise Skip("no step tag in input")
    if len(labelled) != len(text) - len(tag_offsets) * (len(STEP_TAG) - 1):
        raise Skip("step counts of input and label disagree")

    steps, labels, previous_end = [], [], start
    for k, offset in enumerate(tag_offsets):
        label_at = offset - k * (len(STEP_TAG) - 1)
        label_from = previous_end - k * (len(STEP_TAG) - 1)
        if labelled[label_from:label_at] != text[previous_end:offset]:
            raise Skip("label text does not line up with input")
        mark = labelled[label_at]
        if mark not in "+-":
            raise Skip("step counts of input and label disagree")
        step = text[previous_end:offset].strip()
        if not step:
            raise Skip("empty step")
        steps.append(step)
        labels.append(mark)
        previous_end = offset + len(STEP_TAG)
    if text[previous_end:].strip():
        raise Skip("text after the last step tag")
    record = {"src": question, "tgt": [], "responses": steps, "labels": labels}
    if "task" in raw:
        record["task"] = raw["task"]
    return record


def convert_processbench(raw: dict) -> dict:
    _require(raw, ("problem", "steps", "label"))
    steps, first_error = raw["steps"], raw["label"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise Skip("steps is not a non-empty list of strings")
    if not isinstance(first_error, int) or not -1 <= first_error < len(steps):
        raise Skip("label is not -1 or a step index")
    wrong_from = len(steps) if first_error == -1 else first_error
    record = {
        "src": raw["problem"],
        "tgt": [],
        "responses": [s.strip() for s in steps],
        "labels": ["+" if i < wrong_from else "-" for i in range(len(steps))],
        "first_error": first_error,
    }
    for key in ("id", "generator", "final_answer_correct"):
        if key in raw:
            record[key] = raw[key]
    return record


def convert_prm800k(raw: dict, neutral: str = "positive") -> dict:
    _require(raw, ("question", "label"))
    question, label = raw["question"], raw["label"]
    if not isinstance(question, dict) or "problem" not in question or not isinstance(label, dict):
        raise Skip("question.problem or label is missing")
    steps, labels = [], []
    for step in label.get("steps") or []:
        chosen = step.get("chosen_completion")
        if chosen is None:
            break
        completions = step.get("completions") or []
        if not isinstance(chosen, int) or not 0 <= chosen < len(completions):
            raise Skip("chosen_completion does not index a completion")
        completion = completions[chosen]
        rating = completion.get("rating")
        if rating == 0:
            if neutral == "drop":
                break
            mark = "+" if neutral == "positive" else "-"
        elif rating in (1, -1):
            mark = "+" if rating == 1 else "-"
        else:
            raise Skip(f"rating {rating!r} is not -1, 0 or +1")
        if not completion.get("text", "").strip():
            raise Skip("empty step text")
        steps.append(completion["text"].strip())
        labels.append(mark)
        if mark == "-":
            break
    if not steps:
        raise Skip("no rated step on the chosen path")
    record = {"src": question["problem"], "tgt": [], "responses": steps, "labels": labels}
    if "ground_truth_answer" in question:
        record["ground_truth_answer"] = question["ground_truth_answer"]
    if label.get("finish_reason") is not None:
        record["finish_reason"] = label["finish_reason"]
    return record


@dataclass
class ConversionReport:
    source_format: str
    read: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    steps: int = 0

    def as_dict(self) -> dict:
        return {
            "format": self.source_format,
            "read": self.read,
            "converted": self.converted,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "steps": self.steps,
        }


def convert_prmbench(raw: dict) -> dict:
    """PRMBench: the ``modified_process`` steps, ``-`` at the 1-indexed ``error_steps`` only (PRMBench
    labels each erroneous step, not every step after the first error)."""
    _require(raw, ("modified_question", "modified_process", "error_steps"))
    steps, errors = raw["modified_process"], raw["error_steps"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise Skip("modified_process is not a non-empty list of strings")
    if not isinstance(errors, list) or not all(isinstance(e, int) and 1 <= e <= len(steps) for e in errors):
        raise Skip("error_steps is not a list of 1-indexed step numbers")
    record = {
        "src": raw["modified_question"],
        "tgt": [],
        "responses": [s.strip() for s in steps],
        "labels": ["-" if i + 1 in errors else "+" for i in range(len(steps))],
    }
    for key in ("idx", "classification"):
        if key in raw:
            record[key] = raw[key]
    return record


def convert_best_of_n(raw: dict) -> dict | list[dict]:
    """Grouped candidates ``{id, problem, candidates: [{steps, answer, correct}]}``: one unlabelled
    record per candidate, with ``group``, ``answer`` and ``correct`` kept for ``evaluate``."""
    _require(raw, ("id", "problem", "candidates"))
    candidates = raw["candidates"]
    if not isinstance(candidates, list) or not candidates:
        raise Skip("candidates is not a non-empty list")
    records = []
    for candidate in candidates:
        steps = candidate.get("steps") if isinstance(candidate, dict) else None
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise Skip("a candidate's steps is not a non-empty list of strings")
        if not isinstance(candidate.get("correct"), bool):
            raise Skip("a candidate's correct is not true/false")
        records.append({"src": raw["problem"], "tgt": [], "responses": [s.strip() for s in steps],
                        "group": raw["id"], "answer": candidate.get("answer"), "correct": candidate["correct"]})
    return records


def converter_for(source_format: str, neutral: str = "positive") -> Callable[[dict], dict]:
    if source_format == "math-shepherd":
        return convert_math_shepherd
    if source_format == "processbench":
        return convert_processbench
    if source_format == "prmbench":
        return convert_prmbench
    if source_format == "best-of-n":
        return convert_best_of_n
    if source_format == "prm800k":
        if neutral not in NEUTRAL_CHOICES:
            raise ValueError(f"--neutral must be one of {', '.join(NEUTRAL_CHOICES)}, got {neutral!r}")
        return lambda raw: convert_prm800k(raw, neutral)
    raise ValueError(f"unknown format {source_format!r}; choose one of {', '.join(FORMATS)}")


def convert_file(
    source_format: str, input_path: str | Path, output_path: str | Path, *, neutral: str = "positive",
    show_progress: bool = True,
) -> ConversionReport:
    """Convert a whole file; the output appears only when complete."""
    convert = converter_for(source_format, neutral)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    report = ConversionReport(source_format)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            records = progress(iter_raw_records(input_path), desc=f"converting {Path(input_path).name}",
                               unit="records", enabled=show_progress)
            for index, line, raw in records:
                if index == 0:
                    _check_signature(raw, source_format, input_path)
                report.read += 1
                try:
                    record = convert(raw)
                except Skip as reason:
                    report.skipped[str(reason)] += 1
                    continue
                for converted in record if isinstance(record, list) else [record]:
                    out.write(json.dumps(converted, ensure_ascii=False) + "\n")
                    report.converted += 1
                    report.steps += len(converted["responses"])
        if report.read == 0:
            raise FormatError(f"{input_path}: no records")
        tmp.replace(output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _check_signature(raw: Any, source_format: str, path: str | Path) -> None:
    keys = _SIGNATURE[source_format]
    if not isinstance(raw, dict) or any(k not in raw for k in keys):
        found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        others = [name for name, sig in _SIGNATURE.items()
                  if name != source_format and isinstance(raw, dict) and all(k in raw for k in sig)]
        hint = f"; it looks like {others[0]} data" if others else ""
        raise FormatError(
            f"{path}: not {source_format} data: its first record should have {', '.join(keys)} but has "
            f"{found}{hint}"
        )

