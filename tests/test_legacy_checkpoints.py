"""Checkpoints written before the one-way layout (commit 0484b49) still load and give the same
numbers and pictures: log_prob and bits/dim within 1e-6 relative, identical samples at a seed, the
same outlier scores to float32 rounding (1e-5: the density-of-states score is a mixture density of
standardised statistics, which turns the 1e-7 relative float32 rounding of the level bits/dim into
a few 1e-6). The files and the generator are in tests/legacy/."""

import json
import math
import os

import numpy as np
import pytest

from tests.legacy.make_legacy import HERE, KINDS, measure


def _close(a, b, rel=1e-6, abs_=1e-6):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel, abs_) for x, y in zip(a, b))
    if isinstance(a, float) and not math.isfinite(a):
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_legacy_checkpoint_gives_the_same_numbers_and_pictures(name):
    with open(os.path.join(HERE, f"{name}_expected.json")) as f:
        expected = json.load(f)
    stored = np.load(os.path.join(HERE, f"{name}_pictures.npz"))
    values, arrays = measure(os.path.join(HERE, f"{name}.pt"), KINDS[name]["size"])
    assert set(values) == set(expected)
    for key, value in expected.items():
        abs_ = 1e-5 if key.startswith("ood_") else 1e-6
        assert _close(values[key], value, abs_=abs_), (key, values[key], value)
    assert set(arrays) == set(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(arrays[key], stored[key], err_msg=key)
