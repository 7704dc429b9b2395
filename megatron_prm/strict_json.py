"""JSON that strict readers accept: NaN and infinities become ``null`` (Python's ``json`` would write
``NaN``/``Infinity``, which RFC 8259 parsers such as ``jq`` or JavaScript's ``JSON.parse`` reject)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NumPy's too) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) or type(value).__name__ in ("float32", "float64", "float16"):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite numbers as null; never writes NaN."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
