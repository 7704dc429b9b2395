"""Public PRM data sets -> records of this project's format ``{src, tgt, responses, labels, ...}``.

Each converter takes one raw record and returns a converted record, or raises :class:`Skip` with the
reason; :func:`convert_file` streams a file through one of them, counts what was converted and what was
skipped (by reason) and the labels written, and writes JSONL under a temporary name that is renamed
when complete.

- Math-Shepherd ``{input, label, task}``: ``input`` is the question, then steps ``"Step 1: ... ки"``;
  ``label`` is the same text with every ``ки`` replaced by ``+`` or ``-``. ``ки`` is two characters and
  its label one, so the k-th tag at offset ``p`` in ``input`` has its label at ``p - k`` in ``label``;
  the text around the tags must agree. The first step starts at ``Step 1:``, else at ``step 1:``, else
  right after the question's only ``?``, as TRL's conversion script did
  (huggingface/trl examples/datasets/math_shepherd.py, removed upstream in 2026). A record whose
  question contains the tag, whose label text does not line up with the input, or whose tag count
  differs from its label count is skipped, never mislabelled.
- ProcessBench ``{id, generator, problem, steps, final_answer_correct, label}``: ``label`` is the index
  of the first wrong step (-1: none). Steps before it are ``+``, it and later ones ``-``. ``id`` and the
  first-error index are kept for evaluation.
- PRM800K ``{question, label: {steps: [{completions: [{text, rating}], chosen_completion,
  human_completion}]}}``, by its README (openai/prm800k): the solution is, step by step,
  ``completions[chosen_completion]``, or the labeller's own ``human_completion`` (phase 1; a step written
  to be correct, so ``+``) where ``chosen_completion`` is null. Phase 2 pre-generates every solution
  (``question.pre_generated_steps``; step i's ``completions[0]`` is its i-th step): a ``found_error``
  solution ends at its first -1 step, whose ``chosen_completion`` is null, and that rated
  ``completions[0]`` is the solution's one ``-`` label. Rating +1 is ``+``, -1 is ``-``, 0 follows
  ``neutral`` (positive, negative, or drop: the solution ends before the step). The solution also ends
  after the first ``-`` step and before a step with neither a chosen nor a human completion. A
  ``chosen_completion`` that indexes no completion skips the record, with that reason.
- PRMBench (ssmisya/PRMBench, ``mr_eval/tasks/prmtest_classified/task.py``, ``load_data_function``):
  one record per ``(classification, idx)``: the ``modified_process`` with ``-`` at its 1-indexed
  ``error_steps`` (an index past the last step names no step: the official scorer keeps such rows), and
  for each ``redundency`` row the unmodified ``original_process`` once, all ``+``, as class ``correct``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from megatron_prm.data.records import RecordError, iter_raw_records, validate_record
from megatron_prm.data.source_schemas import SOURCE_SCHEMAS, SOURCE_SIGNATURES, SchemaProblem, schema_problem
from megatron_prm.progress import progress

STEP_TAG = "ки"
# PRMBench: the rows whose original_process also serves as an all-correct sample, and that sample's class.
PRMBENCH_CORRECT_SOURCE = "redundency"
PRMBENCH_CORRECT = "correct"
FORMATS = ("math-shepherd", "processbench", "prm800k", "prmbench", "best-of-n")
NEUTRAL_CHOICES = ("positive", "negative", "drop")
# Keys whose absence in the first record means the file is of another format.


class Skip(Exception):
    """A record that cannot be converted faithfully; the message is the reason counted."""


class SchemaSkip(Skip):
    """A record with a field its format's schema refuses; counted under the field and the types."""

    def __init__(self, problem: SchemaProblem):
        super().__init__(problem.reason)
        self.problem = problem


class FormatError(ValueError):
    """The input file is not of the format that was named."""


def _require(raw: Any, keys: tuple[str, ...], source_format: str) -> None:
    """Skip a record without the format's keys, or with a field its schema refuses."""
    if not isinstance(raw, dict):
        raise Skip("not a JSON object")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise Skip(f"missing {', '.join(missing)}")
    problem = schema_problem(raw, SOURCE_SCHEMAS[source_format])
    if problem is not None:
        raise SchemaSkip(problem)


# Questions of Math-Shepherd that hold a stray step tag of their own (TRL's list of annotation errors).
_STRAY_TAG_QUESTIONS = (
    "Mr. Rocky", "Parker", "What is the smallest positive", " The Myth", "Let $\\mathbf{a}$", "Find the arithmetic",
    "Determine an ordered pair", "Determine the ordered pair", "At the Quill and Scroll stationery",
    "Round to the nearest", r"Calculate $\sqrt{10p}", r"Simplify $\sqrt{28x}",
)


def _first_step_start(text: str, first_tag: int) -> int:
    """Where the first step begins in ``text``: TRL's rule, applied to the text before the first tag."""
    head = text[:first_tag]
    markers = ("Step 1:", "step 1:")
    for marker in markers:
        if marker in head:
            if head.count(marker) > 1:
                raise Skip(f"more than one '{marker}' before the first step tag")
            return head.index(marker)
    if any(marker in text for marker in markers):
        raise Skip("question contains the step tag")  # the first tag comes before "Step 1:"
    if head.count("?") != 1:
        raise Skip("no 'Step 1:' and not exactly one '?' before the first step tag")
    return head.index("?") + 1


def convert_math_shepherd(raw: dict) -> dict:
    _require(raw, ("input", "label"), "math-shepherd")
    text, labelled = raw["input"], raw["label"]
    if not isinstance(text, str) or not isinstance(labelled, str):
        raise Skip("input or label is not a string")
    if text.startswith(_STRAY_TAG_QUESTIONS):
        raise Skip("question contains the step tag")
    tag_offsets = []
    at = text.find(STEP_TAG)
    while at >= 0:
        tag_offsets.append(at)
        at = text.find(STEP_TAG, at + len(STEP_TAG))
    if not tag_offsets:
        raise Skip("no step tag in input")
    start = _first_step_start(text, tag_offsets[0])
    question = text[:start].strip()
    if labelled[:start] != text[:start]:
        raise Skip("label text does not line up with input")
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
    _require(raw, ("problem", "steps", "label"), "processbench")
    steps, first_error = raw["steps"], raw["label"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise Skip("steps is not a non-empty list of strings")
    if isinstance(first_error, bool) or not isinstance(first_error, int) or not -1 <= first_error < len(steps):
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


def _rating_mark(rating: Any, neutral: str) -> Optional[str]:
    """The label of a PRM800K rating; None where the solution ends before the step (neutral: drop)."""
    if rating == 0 and not isinstance(rating, bool):
        return None if neutral == "drop" else ("+" if neutral == "positive" else "-")
    if rating in (1, -1) and not isinstance(rating, bool):
        return "+" if rating == 1 else "-"
    raise Skip(f"rating {rating!r} is not -1, 0 or +1")


def _step_text(completion: Any) -> str:
    text = completion.get("text") if isinstance(completion, dict) else completion
    if not isinstance(text, str) or not text.strip():
        raise Skip("empty step text")
    return text.strip()


def _prm800k_path(label: dict, phase2: bool, neutral: str) -> Iterator[tuple[str, str]]:
    """``(step text, label)`` along the labelled solution, up to where it ends."""
    for step in label.get("steps") or []:
        if not isinstance(step, dict):
            raise Skip("a step is not a JSON object")
        chosen, human = step.get("chosen_completion"), step.get("human_completion")
        completions = step.get("completions") or []
        if chosen is not None:
            if isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < len(completions):
                raise Skip("chosen_completion does not index a completion")
            mark = _rating_mark(completions[chosen].get("rating"), neutral)
            if mark is None:
                return
            yield _step_text(completions[chosen]), mark
            if mark == "-":
                return
        elif human is not None:
            yield _step_text(human), "+"  # phase 1: the labeller's own step, written to be correct
        elif phase2 and completions and completions[0].get("rating") == -1:
            yield _step_text(completions[0]), "-"  # the pre-generated step where the first error was found
            return
        else:
            return  # no chosen and no human step: the labelled solution ends here


def convert_prm800k(raw: dict, neutral: str = "positive") -> dict:
    _require(raw, ("question", "label"), "prm800k")
    question, label = raw["question"], raw["label"]
    if not isinstance(question, dict) or "problem" not in question or not isinstance(label, dict):
        raise Skip("question.problem or label is missing")
    phase2 = isinstance(question.get("pre_generated_steps"), list)
    path = list(_prm800k_path(label, phase2, neutral))
    if not path:
        raise Skip("no rated step on the chosen path")
    record = {"src": question["problem"], "tgt": [], "responses": [text for text, _ in path],
              "labels": [mark for _, mark in path]}
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
    # reason -> the first record skipped for a field its schema refuses: "file: record N, field F: expected ..."
    first_of_reason: dict = field(default_factory=dict)
    steps: int = 0
    labels: Counter = field(default_factory=Counter)  # "good" ("+") and "bad" ("-") labels written

    def add(self, record: dict) -> None:
        self.converted += 1
        self.steps += len(record["responses"])
        marks = record.get("labels") or []
        self.labels.update({"good": marks.count("+"), "bad": marks.count("-")})

    def as_dict(self) -> dict:
        return {
            "format": self.source_format,
            "read": self.read,
            "converted": self.converted,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "first_skipped_by_reason": dict(sorted(self.first_of_reason.items())),
            "steps": self.steps,
            "label_counts": {name: self.labels[name] for name in ("good", "bad")},
        }


def _prmbench_steps(steps: Any, name: str) -> list[str]:
    if not isinstance(steps, list) or not steps or not all(isinstance(x, str) and x.strip() for x in steps):
        raise Skip(f"{name} is not a non-empty list of strings")
    return [x.strip() for x in steps]


def convert_prmbench(raw: dict) -> list[dict]:
    """PRMBench as the official loader builds it: the ``modified_process`` with ``-`` at the 1-indexed
    ``error_steps`` only (PRMBench labels each erroneous step, not every step after the first error; an
    index past the last step marks nothing), kept with ``error_steps``, ``idx`` and ``classification``;
    for a ``redundency`` row also its ``original_process``, all ``+``, as class ``correct``. Of the same
    ``(classification, idx)`` twice, :func:`convert_file` keeps the first, as the official loader does."""
    _require(raw, ("modified_question", "modified_process", "error_steps"), "prmbench")
    steps = _prmbench_steps(raw["modified_process"], "modified_process")
    errors = raw["error_steps"]
    if not isinstance(errors, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                               for e in errors):
        raise Skip("error_steps is not a list of 1-indexed step numbers")
    meta = {key: raw[key] for key in ("idx", "classification") if key in raw}
    records = [{"src": raw["modified_question"], "tgt": [], "responses": steps,
                "labels": ["-" if i + 1 in errors else "+" for i in range(len(steps))],
                "error_steps": errors, **meta}]
    if raw.get("classification") == PRMBENCH_CORRECT_SOURCE:
        _require(raw, ("original_question", "original_process"), "prmbench")
        original = _prmbench_steps(raw["original_process"], "original_process")
        records.insert(0, {"src": raw["original_question"], "tgt": [], "responses": original,
                           "labels": ["+"] * len(original), "error_steps": [],
                           **meta, "classification": PRMBENCH_CORRECT})
    return records


def prmbench_key(record: dict) -> Optional[str]:
    """The official scorer's id of a converted PRMBench record, ``{classification}_{idx}``."""
    if "idx" not in record or "classification" not in record:
        return None
    return f"{record['classification']}_{record['idx']}"


def convert_best_of_n(raw: dict) -> dict | list[dict]:
    """Grouped candidates ``{id, problem, candidates: [{steps, answer, correct}]}``: one unlabelled
    record per candidate, with ``group``, ``answer`` and ``correct`` kept for ``evaluate``."""
    _require(raw, ("id", "problem", "candidates"), "best-of-n")
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
    """Convert a whole file; the output appears only when complete. Records that are not valid JSON
    or not UTF-8 are skipped and counted like records a converter cannot convert."""
    convert = converter_for(source_format, neutral)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    report = ConversionReport(source_format)
    seen_prmbench: set[str] = set()  # the official loader keeps one record per (classification, idx)
    signature_checked = False
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            records = progress(iter_raw_records(input_path, keep_invalid=True),
                               desc=f"converting {Path(input_path).name}", unit="records", enabled=show_progress)
            for index, line, raw in records:
                report.read += 1
                if isinstance(raw, RecordError):
                    report.skipped[raw.reason] += 1
                    continue
                if not signature_checked:
                    _check_signature(raw, source_format, input_path)
                    signature_checked = True
                try:
                    record = convert(raw)
                except Skip as reason:
                    report.skipped[str(reason)] += 1
                    if isinstance(reason, SchemaSkip):
                        report.first_of_reason.setdefault(str(reason), str(RecordError(
                            input_path, index, reason.problem.field, reason.problem.detail, line)))
                    continue
                for converted in record if isinstance(record, list) else [record]:
                    refusal = check_data_refusal(converted, labelled=source_format != "best-of-n")
                    if refusal is not None:
                        report.skipped[refusal] += 1
                        continue
                    key = prmbench_key(converted) if source_format == "prmbench" else None
                    if key is not None:
                        if key in seen_prmbench:
                            report.skipped["the same classification and idx again"] += 1
                            continue
                        seen_prmbench.add(key)
                    out.write(json.dumps(converted, ensure_ascii=False) + "\n")
                    report.add(converted)
        if report.read == 0:
            raise FormatError(f"{input_path}: no records")
        tmp.replace(output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def check_data_refusal(record: dict, labelled: bool) -> Optional[str]:
    """Why ``check-data`` would refuse a converted record (None: it would not): the converters never write
    one. The step tag is refused anywhere in the text, as check-data refuses the default placeholder."""
    try:
        validate_record(record, path="<converted>", index=0, line=None, reward_tokens=("+", "-"),
                        require_labels=labelled)
    except RecordError as err:
        return f"converted record invalid: {err.field.split('[')[0]} {err.problem}"
    texts = [record["src"]] if isinstance(record["src"], str) else list(record["src"])
    if any(STEP_TAG in text for text in [*texts, *record["responses"]]):
        return "the step tag in the question or a step"
    return None


def _check_signature(raw: Any, source_format: str, path: str | Path) -> None:
    keys = SOURCE_SIGNATURES[source_format]
    if not isinstance(raw, dict) or any(k not in raw for k in keys):
        found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        others = [name for name, sig in SOURCE_SIGNATURES.items()
                  if name != source_format and isinstance(raw, dict) and all(k in raw for k in sig)]
        hint = f"; it looks like {others[0]} data" if others else ""
        raise FormatError(
            f"{path}: not {source_format} data: its first record should have {', '.join(keys)} but has "
            f"{found}{hint}"
        )

