"""The record format ``{src, tgt, responses, labels}``: reading JSON / JSONL files and validating records.

``src`` and ``tgt`` are a string or a list of turns; ``src`` has one turn more than ``tgt`` and the
conversation reads ``src[0], tgt[0], src[1], tgt[1], ..., src[-1]``. ``responses`` is the list of
steps of the solution being judged; ``labels`` holds one label per step: a reward token (``"+"`` /
``"-"`` by default) or a float in [0, 1], the probability that the step is good (a soft label).
Any other keys are kept as metadata.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional


class RecordError(ValueError):
    """A malformed record: the message names the file, the record and the field."""

    def __init__(self, path: str | Path, index: int, field_name: str, problem: str, line: Optional[int] = None):
        self.path = str(path)
        self.index = index
        self.field = field_name
        self.problem = problem
        self.line = line
        where = f"{path}: record {index}" + (f" (line {line})" if line is not None else "")
        super().__init__(f"{where}, field {field_name!r}: {problem}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses from a worker process.
        return (RecordError, (self.path, self.index, self.field, self.problem, self.line))


@dataclass(frozen=True)
class Record:
    """A validated record; ``labels`` holds P(good) per step, or None where the file has no labels."""

    src: tuple[str, ...]
    tgt: tuple[str, ...]
    responses: tuple[str, ...]
    labels: Optional[tuple[float, ...]]
    index: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def open_text(path: str | Path):
    """Open a text file, transparently gunzipping ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_raw_records(path: str | Path) -> Iterator[tuple[int, Optional[int], Any]]:
    """Yield ``(record index, first line or None, parsed JSON value)`` from a data file.

    Reads a JSON array, JSONL, or a stream of (pretty-printed) JSON objects one after another, as
    PRM800K's example files are. Lines are read one at a time, so a JSONL file is never held whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open_text(path) as handle:
        first = ""
        while True:
            ch = handle.read(1)
            if not ch or not ch.isspace():
                first = ch
                break
        handle.seek(0)
        if first == "[":
            try:
                items = json.load(handle)
            except json.JSONDecodeError as err:
                raise RecordError(path, -1, "<file>", f"not a valid JSON array: {err}") from err
            for index, item in enumerate(items):
                yield index, None, item
            return
        yield from _iter_json_stream(handle, path)


def _iter_json_stream(handle, path: Path) -> Iterator[tuple[int, int, Any]]:
    """JSON values one after another: one per line, or spread over lines (a new top-level ``{`` at
    the start of a line ends a value that has not parsed, which is then reported as malformed)."""
    index, buffer, start_line = 0, "", 0
    for line_no, line in enumerate(handle, start=1):
        if not buffer:
            if not line.strip():
                continue
            start_line = line_no
        elif line.startswith(("{", "[")):
            raise RecordError(path, index, "<line>", "not valid JSON", start_line)
        buffer += line
        try:
            item = json.loads(buffer)
        except json.JSONDecodeError as err:
            if err.msg.startswith("Extra data"):
                raise RecordError(path, index, "<line>", f"not valid JSON: {err.msg}", start_line) from err
            continue
        yield index, start_line, item
        index += 1
        buffer = ""
    if buffer.strip():
        raise RecordError(path, index, "<line>", "not valid JSON (unterminated)", start_line)


def _turns(value: Any, name: str, fail) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(turn, str) for turn in value):
        return tuple(value)
    fail(name, f"must be a string or a list of strings, got {type(value).__name__}")
    raise AssertionError  # fail raises


def parse_label(value: Any, reward_tokens: tuple[str, str]) -> Optional[float]:
    """``"+"`` -> 1.0, ``"-"`` -> 0.0, a number in [0, 1] -> itself; None if it is none of those."""
    if isinstance(value, str):
        if value == reward_tokens[0]:
            return 1.0
        if value == reward_tokens[1]:
            return 0.0
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and 0.0 <= number <= 1.0:
            return number
    return None


def validate_record(
    raw: Any,
    *,
    path: str | Path,
    index: int,
    line: Optional[int],
    reward_tokens: tuple[str, str],
    require_labels: bool = True,
) -> Record:
    """Check one parsed record and return it normalised; raise RecordError naming the field."""

    def fail(field_name: str, problem: str):
        raise RecordError(path, index, field_name, problem, line)

    if not isinstance(raw, dict):
        fail("<record>", f"must be a JSON object, got {type(raw).__name__}")
    for key in ("src", "responses"):
        if key not in raw:
            fail(key, "is missing")
    src = _turns(raw["src"], "src", fail)
    tgt = _turns(raw.get("tgt", []), "tgt", fail)
    if len(src) != len(tgt) + 1:
        fail("tgt", f"src must have one more turn than tgt, got {len(src)} src and {len(tgt)} tgt turns")
    responses = raw["responses"]
    if isinstance(responses, str):
        responses = [responses]
    if not isinstance(responses, list) or not responses:
        fail("responses", "must be a non-empty list of step strings")
    for i, step in enumerate(responses):
        if not isinstance(step, str):
            fail(f"responses[{i}]", f"must be a string, got {type(step).__name__}")
        if not step.strip():
            fail(f"responses[{i}]", "is empty")

    labels = None
    if "labels" in raw or require_labels:
        if "labels" not in raw:
            fail("labels", "is missing")
        raw_labels = raw["labels"]
        if not isinstance(raw_labels, list):
            fail("labels", f"must be a list with one label per step, got {type(raw_labels).__name__}")
        if len(raw_labels) != len(responses):
            fail("labels", f"has {len(raw_labels)} labels for {len(responses)} steps in 'responses'")
        parsed = []
        for i, value in enumerate(raw_labels):
            label = parse_label(value, reward_tokens)
            if label is None:
                fail(
                    f"labels[{i}]",
                    f"must be {reward_tokens[0]!r}, {reward_tokens[1]!r} or a number in [0, 1], got {value!r}",
                )
            parsed.append(label)
        labels = tuple(parsed)

    meta = {k: v for k, v in raw.items() if k not in ("src", "tgt", "responses", "labels")}
    return Record(src=src, tgt=tgt, responses=tuple(responses), labels=labels, index=index, meta=meta)
