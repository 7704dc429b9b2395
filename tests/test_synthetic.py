"""The demo's generator: labels agree with the arithmetic, and errors leave no surface trace."""

import random
import re

from megatron_prm.data.synthetic import SyntheticOptions, make_record

STEP = re.compile(r"^(\d+) × (\d) = (\d+)$")


def check_record(record):
    steps, labels = record["responses"], record["labels"]
    assert len(steps) == len(labels) and steps[-1].startswith("The answer is ")
    first_wrong = None
    for i, step in enumerate(steps[:-1]):
        before, factor, after = map(int, STEP.match(step).groups())
        if i:  # every step starts from the previous step's result, right or wrong
            assert before == int(STEP.match(steps[i - 1]).group(3))
        if after != before * factor:
            assert first_wrong is None, "one planted error per record"
            first_wrong = i
            assert len(str(after)) == len(str(before * factor)) and 1 <= abs(after - before * factor) <= 4
            if factor == 2:
                assert after % 2 == 0  # a wrong doubled number is still even
    expected = ["+"] * len(steps) if first_wrong is None else ["+"] * first_wrong + ["-"] * (len(steps) - first_wrong)
    assert labels == expected
    assert record["first_error"] == (-1 if first_wrong is None else first_wrong)
    assert steps[-1] == f"The answer is {STEP.match(steps[-2]).group(3)}."
    return first_wrong


def test_labels_follow_the_arithmetic_for_both_factors():
    rng = random.Random(0)
    for options in (SyntheticOptions(), SyntheticOptions(factors=(2, 3))):
        outcomes = [check_record(make_record(rng, options)) for _ in range(2000)]
        erroneous = sum(o is not None for o in outcomes) / len(outcomes)
        assert 0.55 <= erroneous <= 0.65  # error_rate 0.6
        assert {o for o in outcomes if o is not None} == {0, 1, 2, 3}


def test_majority_class_stays_below_seventy_percent():
    rng = random.Random(1)
    labels = [label for _ in range(3000) for label in make_record(rng)["labels"]]
    assert 0.5 <= labels.count("+") / len(labels) <= 0.65
