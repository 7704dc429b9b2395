"""Verifiable synthetic PRM data: multi-step arithmetic word problems with planted errors.

Each problem starts from a quantity and applies two to four changes ("buys 14 more", "gives away 9").
The solution has one step per change, written ``"{before} + {change} = {after}"``, and a final
``"The answer is {after}."`` step. In an erroneous solution one arithmetic step gets a wrong result:
off by 1 to 9, with the same number of digits as the right one, written exactly like a right step, so
only redoing the arithmetic reveals it. Later steps compute correctly from the wrong value. As in
Math-Shepherd, the wrong step and every step after it are labelled ``-``; earlier steps ``+``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luis")
ITEMS = ("apples", "marbles", "stamps", "books", "coins", "shells", "cards", "pencils", "stickers", "eggs")
GAINS = ("buys {n} more {item}", "finds {n} {item}", "gets {n} {item} from a friend", "wins {n} {item}")
LOSSES = ("gives away {n} {item}", "loses {n} {item}", "sells {n} {item}", "uses {n} {item}")


@dataclass(frozen=True)
class SyntheticOptions:
    min_changes: int = 2
    max_changes: int = 4
    min_value: int = 10
    max_value: int = 99
    max_change: int = 40
    error_rate: float = 0.5


def _wrong_result(rng: random.Random, right: int) -> int:
    """A plausible wrong result: off by 1-9, non-negative, with as many digits as the right one."""
    candidates = [
        right + delta
        for delta in range(-9, 10)
        if delta and right + delta >= 0 and len(str(right + delta)) == len(str(right))
    ]
    return rng.choice(candidates)


def make_record(rng: random.Random, options: SyntheticOptions = SyntheticOptions()) -> dict:
    """One problem with its solution steps and their labels."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(options.min_value, options.max_value)
    start = value
    changes = []
    for _ in range(rng.randint(options.min_changes, options.max_changes)):
        can_gain = value + 2 <= options.max_value
        can_lose = value - 2 >= options.min_value
        gain = can_gain and (not can_lose or rng.random() < 0.5)
        limit = (options.max_value - value) if gain else (value - options.min_value)
        amount = rng.randint(2, min(options.max_change, limit))
        changes.append((gain, amount))
        value = value + amount if gain else value - amount

    clauses = [rng.choice(GAINS if gain else LOSSES).format(n=amount, item=item) for gain, amount in changes]
    question = f"{name} has {start} {item}. " + " ".join(
        f"{'Then' if i else 'First'} {name} {clause}." for i, clause in enumerate(clauses)
    ) + f" How many {item} does {name} have now?"

    error_step = rng.randrange(len(changes)) if rng.random() < options.error_rate else None
    steps, labels = [], []
    current, wrong_so_far = start, False
    for i, (gain, amount) in enumerate(changes):
        result = current + amount if gain else current - amount
        if i == error_step:
            result = _wrong_result(rng, result)
            wrong_so_far = True
        steps.append(f"{current} {'+' if gain else '-'} {amount} = {result}")
        labels.append("-" if wrong_so_far else "+")
        current = result
    steps.append(f"The answer is {current}.")
    labels.append("-" if wrong_so_far else "+")
    return {
        "src": question,
        "tgt": [],
        "responses": steps,
        "labels": labels,
        "first_error": error_step if error_step is not None else -1,
    }


def write_dataset(path: str | Path, count: int, seed: int, options: SyntheticOptions = SyntheticOptions()) -> Path:
    """Write ``count`` records as JSONL (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(make_record(rng, options), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
