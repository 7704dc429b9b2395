"""The record format ``{src, tgt, responses, labels}``: reading JSON / JSONL files and validating records.

``src`` and ``tgt`` are a string or a list of turns; ``src`` has one turn more than ``tgt`` and the
conversation reads ``src[0], tgt[0], src[1], tgt[1], ..., src[-1]``. ``responses`` is the list of
steps of the solution being judged; ``labels`` holds one label per step: a reward token (``"+"`` /
``"-"`` by default) or a float in [0, 1], the probability that the step is good (a soft label).
Any other keys are kept as metadata.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from megatron_prm.data.source_schemas import source_format_of


LONE_SURROGATE = "holds a lone surrogate"
# Faults of a line as a whole, before there is a record to validate: the field names RecordError uses.
_LINE_FAULTS = {"<json>": "not valid JSON", "<encoding>": "not UTF-8"}


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

    @property
    def reason(self) -> str:
        """A short reason under which a skipped record is counted."""
        if self.problem.startswith(LONE_SURROGATE):
            return "a lone surrogate in a string"
        return _LINE_FAULTS.get(self.field) or f"invalid {self.field.split('[')[0]}"

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


def open_data(path: Path) -> BinaryIO:
    """A data file (gzipped where its name ends in .gz) opened for reading bytes."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def truncated_gzip(path: Path, line_no: int, err: Exception) -> RecordError:
    return RecordError(path, -1, "<file>", f"not a complete gzip file, unreadable after line {line_no} ({err})")


def decode_line(data: bytes, line_no: int) -> tuple[str, Optional[str]]:
    """``(text, fault)`` of one line's bytes: bytes that are not UTF-8 spoil only their own line (its
    fault says so, and its text has them replaced); the fault is None for a good line. A byte-order mark
    at the start of line 1 is dropped."""
    if line_no == 1 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return data.decode("utf-8", errors="replace"), (
            f"not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} of line {line_no}")


# A \uD800-\uDFFF escape: JSON may spell a lone surrogate, which is no text (it cannot be written as UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class UnreadableValue(ValueError):
    """JSON text whose value cannot be used: nested past the recursion limit, an integer of more digits
    than Python converts, or a string holding a lone surrogate (``field`` names where)."""

    def __init__(self, problem: str, field_name: str = "<json>"):
        super().__init__(problem)
        self.field = field_name


def lone_surrogate_field(value: Any) -> Optional[str]:
    """The path (``responses[2]``, ``label.steps[0]``) of the first string or key in ``value`` holding a
    lone surrogate, or None. Iterative: a value may be nested as deep as the parser allows."""
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "<record>"
        elif isinstance(item, dict):
            for key, child in item.items():
                name = f"{where}.{key}" if where else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return (where or "<record>") + " (a key)"
                pending.append((child, name))
        elif isinstance(item, list):
            pending.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def loads_value(text: str) -> Any:
    """``json.loads`` of a record's text; a value that parses but cannot be used raises
    :class:`UnreadableValue` (``json.JSONDecodeError`` stays the parser's own)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise UnreadableValue("nested deeper than the JSON reader allows (Python's recursion limit)") from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UnreadableValue(f"not readable JSON: {' '.join(str(err).split())[:120]}") from None
    if _SURROGATE_ESCAPE.search(text):
        where = lone_surrogate_field(value)
        if where is not None:
            raise UnreadableValue(f"{LONE_SURROGATE} (a \\uD800-\\uDFFF escape that is no character)", where)
    return value


def parse_json_line(path: str | Path, index: int, line_no: int, text: str, fault: Optional[str]) -> Any:
    """The JSON value of one JSONL line, or the :class:`RecordError` that says why it has none."""
    if fault is not None:
        return RecordError(path, index, "<encoding>", fault, line_no)
    try:
        return loads_value(text)
    except json.JSONDecodeError as err:
        return RecordError(path, index, "<json>", f"not valid JSON: {err.msg}", line_no)
    except UnreadableValue as err:
        return RecordError(path, index, err.field, str(err), line_no)


def _read_lines(path: Path) -> Iterator[tuple[int, str, Optional[str]]]:
    """``(line number, text, fault)`` of every line of a (gzipped) UTF-8 file, decoded one line at a time
    (see :func:`decode_line`). A truncated or corrupt gzip stream is an error of the whole file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    line_no = 0
    try:
        with open_data(path) as handle:
            for line_no, data in enumerate(handle, start=1):
                yield (line_no, *decode_line(data, line_no))
    except GZIP_ERRORS as err:
        raise truncated_gzip(path, line_no, err) from None


def iter_raw_records(path: str | Path, *, keep_invalid: bool = False) -> Iterator[tuple[int, Optional[int], Any]]:
    """Yield ``(record index, first line or None, parsed JSON value)`` from a data file.

    Reads a JSON array, JSONL, or a stream of (pretty-printed) JSON objects one after another, as
    PRM800K's example files are. Lines are read one at a time, so a JSONL file is never held whole.
    A record that is not valid JSON or not UTF-8 raises :class:`RecordError` naming the file, record
    and line; with ``keep_invalid`` that error is yielded in place of the value instead (and reading
    goes on), for readers that count and skip such records. A JSON array is one value: any fault in
    it, like a truncated gzip file, is an error of the whole file.
    """
    path = Path(path)
    source = _iter_json_array(path) if is_json_array(path) else _iter_json_stream(_read_lines(path), path)
    for index, line, value in source:
        if isinstance(value, RecordError) and not keep_invalid:
            raise value
        yield index, line, value


def is_json_array(path: str | Path) -> bool:
    """Whether the file's first non-blank character opens a JSON array."""
    lines = _read_lines(Path(path))
    try:
        first = next((text for _, text, _ in lines if text.strip()), "")
    finally:
        lines.close()
    return first.lstrip().startswith("[")


def _iter_json_array(path: Path) -> Iterator[tuple[int, None, Any]]:
    parts = []
    for line_no, text, fault in _read_lines(path):
        if fault is not None:
            raise RecordError(path, -1, "<file>", fault, line_no)
        parts.append(text)
    text = "".join(parts)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(path, -1, "<file>", f"not a valid JSON array: {err.msg}", err.lineno) from None
    except RecursionError:
        raise RecordError(path, -1, "<file>", "nested deeper than the JSON reader allows (Python's recursion "
                          "limit)") from None
    except ValueError as err:
        raise RecordError(path, -1, "<file>", f"not readable JSON: {' '.join(str(err).split())[:120]}") from None
    if not isinstance(items, list):
        raise RecordError(path, -1, "<file>", f"starts with '[' but holds a {type(items).__name__}")
    check_surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for index, item in enumerate(items):
        where = lone_surrogate_field(item) if check_surrogates else None
        if where is not None:
            yield index, None, RecordError(path, index, where, f"{LONE_SURROGATE} (a \\uD800-\\uDFFF escape "
                                           "that is no character)")
            continue
        yield index, None, item


def _iter_json_stream(lines: Iterator[tuple[int, str, Optional[str]]], path: Path) -> Iterator[tuple[int, int, Any]]:
    """JSON values one after another: one per line, or spread over lines. A new top-level ``{`` at the
    start of a line ends a value that has not parsed, which is then malformed. A malformed value (or one
    with bytes that are not UTF-8) comes as a :class:`RecordError` in place of the value; reading
    resumes at the next line that starts a value."""
    index, buffer, start_line, fault, skipping = 0, "", 0, None, False

    def malformed() -> RecordError:
        if fault is not None:
            return RecordError(path, index, "<encoding>", fault, start_line)
        return RecordError(path, index, "<json>", "not valid JSON", start_line)

    for line_no, line, line_fault in lines:
        starts_value = line.startswith(("{", "["))
        if skipping and not starts_value:
            continue  # the rest of a value already reported
        skipping = False
        if not buffer:
            if not line.strip():
                continue
            start_line = line_no
        elif starts_value:
            yield index, start_line, malformed()
            index, buffer, start_line, fault = index + 1, "", line_no, None
        buffer += line
        fault = fault or line_fault
        if fault is not None:
            continue  # reported once the value ends
        try:
            item = loads_value(buffer)
        except json.JSONDecodeError as err:
            if err.msg.startswith("Extra data"):
                yield index, start_line, RecordError(path, index, "<json>", f"not valid JSON: {err.msg}", start_line)
                index, buffer, skipping = index + 1, "", True
            continue
        except UnreadableValue as err:
            yield index, start_line, RecordError(path, index, err.field, str(err), start_line)
            index, buffer, skipping = index + 1, "", True
            continue
        yield index, start_line, item
        index += 1
        buffer = ""
    if buffer.strip():
        if fault is None:
            yield index, start_line, RecordError(path, index, "<json>", "not valid JSON (unterminated)", start_line)
        else:
            yield index, start_line, malformed()


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
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float: not in [0, 1] either
            return None
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
            source = source_format_of(raw)
            hint = (f"; the record looks like {source} data: convert it first with `megatron-prm convert-data "
                    f"--from {source} --input FILE --output FILE.jsonl`") if source else ""
            fail(key, "is missing" + hint)
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
