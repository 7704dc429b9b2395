"""Verifiable synthetic PRM data: multi-step growth word problems with planted arithmetic errors.

A quantity grows by a fixed factor a few times ("A colony starts with 7 bacteria and triples every
hour. How many bacteria are there after 3 hours?"); tripling by default, doubling on request. The solution has one step per period,
``"{before} × {factor} = {after}"``, and a final ``"The answer is {after}."`` step.

In an erroneous solution one multiplication step gets a wrong result of plausible size: off by a
little, with as many digits as the right result, written exactly like a right step. Only redoing the
multiplication reveals it; in particular a doubled number is only ever off by an even amount, so
parity gives nothing away. Later steps multiply the wrong value correctly. As in Math-Shepherd, the
wrong step and every step after it are labelled ``-`` and the earlier steps ``+``.

Why growth by a fixed factor rather than sums of arbitrary numbers: checking ``a + b = c`` from
step labels alone means learning a three-way interaction, which a model small enough for a
five-minute CPU demo does not pick up in time (measured: no progress over 3,000 steps), whereas
``a × 3 = c`` is a two-way check it learns in about 1,500 steps (mixing doubling in slows that down
by about half again). The pipeline is the same for all of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luis")
SCENES = (
    ("A jar holds {v} marbles and the number of marbles {verb} every day.", "marbles", "days"),
    ("A colony starts with {v} bacteria and {verb} every hour.", "bacteria", "hours"),
    ("{name} has {v} stickers and the collection {verb} every week.", "stickers", "weeks"),
    ("A pond has {v} lilies and the number of lilies {verb} every month.", "lilies", "months"),
    ("{name} saves {v} coins and the savings {verb} every year.", "coins", "years"),
)
VERBS = {2: "doubles", 3: "triples"}
# Wrong results differ by these amounts: a doubled number stays even when it is wrong.
ERRORS = {2: (-4, -2, 2, 4), 3: (-3, -2, -1, 1, 2, 3)}


@dataclass(frozen=True)
class SyntheticOptions:
    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 9
    factors: tuple[int, ...] = (3,)
    error_rate: float = 0.6


def _wrong_result(rng: random.Random, right: int, factor: int) -> int:
    candidates = [right + d for d in ERRORS[factor] if right + d > 0 and len(str(right + d)) == len(str(right))]
    return rng.choice(candidates)


def make_record(rng: random.Random, options: SyntheticOptions = SyntheticOptions()) -> dict:
    """One problem with its solution steps, their labels and the first wrong step (-1 if none)."""
    factor = rng.choice(options.factors)
    value = rng.randint(1, options.max_start)
    periods = rng.randint(options.min_steps, options.max_steps)
    template, things, unit = rng.choice(SCENES)
    question = (
        template.format(v=value, verb=VERBS[factor], name=rng.choice(NAMES))
        + f" How many {things} are there after {periods} {unit}?"
    )
    error_step = rng.randrange(periods) if rng.random() < options.error_rate else None
    steps, labels, wrong = [], [], False
    for period in range(periods):
        result = value * factor
        if period == error_step:
            result = _wrong_result(rng, result, factor)
            wrong = True
        steps.append(f"{value} × {factor} = {result}")
        labels.append("-" if wrong else "+")
        value = result
    steps.append(f"The answer is {value}.")
    labels.append("-" if wrong else "+")
    return {
        "src": question,
        "tgt": [],
        "responses": steps,
        "labels": labels,
        "first_error": -1 if error_step is None else error_step,
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
