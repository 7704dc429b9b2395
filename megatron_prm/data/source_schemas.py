"""The declared shape of each public data set's records, checked before a converter reads a field.

A schema is a tree of small specs (text, integer in a range, true/false, list, object with named fields,
either-of); :func:`schema_problem` walks a raw record against it and returns the first field that does
not fit as ``(field path, expected, got)``, so that ``convert-data`` counts the record under that reason
and names the first such record in full: ``file: record N, field F: expected ..., got ...``. A converter
then only meets the types it expects (no AttributeError on a list where an object was due), and a bool
is never an integer (ProcessBench ``"label": true`` is refused, not taken as step 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union


class _Missing:
    """The value of a field that is absent."""


_MISSING = _Missing()
_INDEX = re.compile(r"\[\d+\]")


# The keys that identify each source format's records (convert-data checks the first record for them).
SOURCE_SIGNATURES = {
    "math-shepherd": ("input", "label"),
    "processbench": ("problem", "steps", "label"),
    "prm800k": ("question", "label"),
    "prmbench": ("modified_question", "modified_process", "error_steps"),
    "best-of-n": ("id", "problem", "candidates"),
}


def source_format_of(raw: Any) -> Optional[str]:
    """The source format a raw record looks like (None: none of them), for a hint to convert it first."""
    if not isinstance(raw, dict):
        return None
    return next((name for name, keys in SOURCE_SIGNATURES.items() if all(key in raw for key in keys)), None)

@dataclass(frozen=True)
class Text:
    """A string; ``blank_ok`` False: with a character other than whitespace."""

    blank_ok: bool = True

    @property
    def expected(self) -> str:
        return "a string" if self.blank_ok else "a non-blank string"


@dataclass(frozen=True)
class Integer:
    """An integer (never true/false) in ``[low, high]``; None: unbounded."""

    low: Optional[int] = None
    high: Optional[int] = None

    @property
    def expected(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer from {self.low} to {self.high}"
        return f"an integer >= {self.low}" if self.low is not None else "an integer"


@dataclass(frozen=True)
class Boolean:
    expected: str = "true or false"


@dataclass(frozen=True)
class Anything:
    expected: str = "any JSON value"


@dataclass(frozen=True)
class ListOf:
    item: "Spec"
    min_items: int = 0

    @property
    def expected(self) -> str:
        size = "a non-empty list" if self.min_items == 1 else "a list"
        return f"{size}, each {self.item.expected}"


@dataclass(frozen=True)
class Field:
    spec: "Spec"
    required: bool = True
    nullable: bool = False


@dataclass(frozen=True)
class Object:
    fields: dict[str, Field]
    name: str = "a JSON object"

    @property
    def expected(self) -> str:
        return self.name


@dataclass(frozen=True)
class OneOf:
    options: tuple["Spec", ...]

    @property
    def expected(self) -> str:
        return " or ".join(option.expected for option in self.options)


Spec = Union[Text, Integer, Boolean, Anything, ListOf, Object, OneOf]


def value_kind(value: Any) -> str:
    """The JSON type of a value, as a reason to count records under."""
    if isinstance(value, str) and not value.strip():
        return "a blank string"
    if isinstance(value, list) and not value:
        return "an empty list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a JSON object", type(None): "null", _Missing: "nothing (the field is missing)"}.get(
        type(value), type(value).__name__)


def describe_value(value: Any) -> str:
    """What a value is, for an error message: its JSON type and a short sample."""
    kind = value_kind(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = str(value) if not isinstance(value, int) or value.bit_length() < 64 else f"{str(value)[:12]}..."
        return f"{kind} {text}"
    if isinstance(value, str):
        return f"{kind} {value[:40]!r}" if value.strip() else f"a blank string {value[:10]!r}"
    if isinstance(value, list):
        return f"{kind} of {len(value)} items" if value else "an empty list"
    return kind


def _fits(value: Any, spec: Spec) -> bool:
    return schema_problem(value, spec) is None


@dataclass(frozen=True)
class SchemaProblem:
    """The first field of a record that its schema refuses."""

    field: str  # with indices: label.steps[3].completions[0].rating
    expected: str
    got: Any

    @property
    def reason(self) -> str:
        """The problem without indices or values, to count records under."""
        field = _INDEX.sub("[]", self.field)
        return f"{field}: expected {self.expected}, got {value_kind(self.got)}"

    @property
    def detail(self) -> str:
        return f"expected {self.expected}, got {describe_value(self.got)}"


def schema_problem(value: Any, spec: Spec, where: str = "") -> Optional[SchemaProblem]:
    """The first field of ``value`` that ``spec`` refuses; None if it fits."""
    def bad() -> SchemaProblem:
        return SchemaProblem(where or "<record>", spec.expected, value)

    if isinstance(spec, Anything):
        return None
    if isinstance(spec, Text):
        return None if isinstance(value, str) and (spec.blank_ok or value.strip()) else bad()
    if isinstance(spec, Boolean):
        return None if isinstance(value, bool) else bad()
    if isinstance(spec, Integer):
        if not isinstance(value, int) or isinstance(value, bool):
            return bad()
        if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
            return bad()
        return None
    if isinstance(spec, OneOf):
        return None if any(_fits(value, option) for option in spec.options) else bad()
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or len(value) < spec.min_items:
            return bad()
        for i, item in enumerate(value):
            problem = schema_problem(item, spec.item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if isinstance(spec, Object):
        if not isinstance(value, dict):
            return bad()
        for name, declared in spec.fields.items():
            path = f"{where}.{name}" if where else name
            if name not in value:
                if declared.required:
                    return SchemaProblem(path, declared.spec.expected, _MISSING)
                continue
            if value[name] is None and declared.nullable:
                continue
            problem = schema_problem(value[name], declared.spec, path)
            if problem is not None:
                return problem
        return None
    raise TypeError(f"not a schema spec: {spec!r}")


STEPS = ListOf(Text(blank_ok=False), min_items=1)
_OPTIONAL = Field(Anything(), required=False)

# PRM800K (openai/prm800k README): a completion is {text, rating, ...}; phase 1's human_completion an object too.
_PRM800K_COMPLETION = Object({"text": Field(Text(), required=False, nullable=True),
                              "rating": Field(Integer(-1, 1), required=False, nullable=True)},
                             name="a completion object")
_PRM800K_STEP = Object({
    "completions": Field(ListOf(_PRM800K_COMPLETION), required=False, nullable=True),
    "chosen_completion": Field(Integer(0), required=False, nullable=True),
    "human_completion": Field(OneOf((_PRM800K_COMPLETION, Text())), required=False, nullable=True),
}, name="a step object")

SOURCE_SCHEMAS: dict[str, Object] = {
    "math-shepherd": Object({"input": Field(Text(blank_ok=False)), "label": Field(Text(blank_ok=False)),
                             "task": _OPTIONAL}),
    "processbench": Object({
        "problem": Field(Text(blank_ok=False)), "steps": Field(STEPS), "label": Field(Integer(-1)),
        "id": _OPTIONAL, "generator": _OPTIONAL, "final_answer_correct": Field(Boolean(), required=False, nullable=True),
    }),
    "prm800k": Object({
        "question": Field(Object({"problem": Field(Text(blank_ok=False)), "ground_truth_answer": _OPTIONAL,
                                  "pre_generated_steps": Field(ListOf(Anything()), required=False, nullable=True)})),
        "label": Field(Object({"steps": Field(ListOf(_PRM800K_STEP), required=False, nullable=True),
                               "finish_reason": _OPTIONAL})),
    }),
    "prmbench": Object({
        "modified_question": Field(Text(blank_ok=False)), "modified_process": Field(STEPS),
        "error_steps": Field(ListOf(Integer(1))), "original_question": Field(Text(blank_ok=False), required=False),
        "original_process": Field(STEPS, required=False), "idx": Field(OneOf((Integer(), Text())), required=False),
        "classification": Field(Text(blank_ok=False), required=False),
    }),
    "best-of-n": Object({
        "id": Field(OneOf((Integer(), Text(blank_ok=False)))), "problem": Field(Text(blank_ok=False)),
        "candidates": Field(ListOf(Object({"steps": Field(STEPS), "correct": Field(Boolean()), "answer": _OPTIONAL},
                                          name="a candidate object"), min_items=1)),
    }),
}
