"""Bootstrap intervals over seeds and queries (mim.training.stats), on hand-made per-query values."""

from __future__ import annotations

import numpy as np
import pytest

from mim.training.stats import Interval, bootstrap_interval, paired_difference


def test_constant_values_give_a_point_interval():
    iv = bootstrap_interval(np.full((3, 50), 0.25))
    assert (iv.mean, iv.lo, iv.hi) == (0.25, 0.25, 0.25)


def test_interval_covers_the_mean_and_is_deterministic_by_seed():
    rng = np.random.default_rng(0)
    hits = (rng.random((3, 200)) < 0.4).astype(float)
    iv = bootstrap_interval(hits)
    assert iv.lo < iv.mean < iv.hi
    assert iv == bootstrap_interval(hits)
    assert iv != bootstrap_interval(hits, seed=1)
    # A 0/1 mean over 600 values has a standard error of about sqrt(.24 / 600) = 0.02: the 95% interval is ~4 se.
    assert 0.04 < iv.hi - iv.lo < 0.15


def test_more_queries_narrow_the_interval():
    rng = np.random.default_rng(1)
    small = bootstrap_interval((rng.random((3, 50)) < 0.5).astype(float))
    large = bootstrap_interval((rng.random((3, 2000)) < 0.5).astype(float))
    assert large.hi - large.lo < 0.5 * (small.hi - small.lo)


def test_seed_to_seed_spread_widens_the_interval():
    rng = np.random.default_rng(2)
    noise = (rng.random((3, 400)) < 0.5).astype(float)
    spread = noise.copy()
    spread[0] = (rng.random(400) < 0.2).astype(float)  # one training seed much worse than the others
    assert bootstrap_interval(spread).hi - bootstrap_interval(spread).lo > 1.5 * (
        bootstrap_interval(noise).hi - bootstrap_interval(noise).lo
    )


def test_one_seed_as_a_vector():
    iv = bootstrap_interval([1.0, 0.0, 1.0, 1.0])
    assert iv.mean == 0.75 and 0.0 <= iv.lo <= iv.mean <= iv.hi <= 1.0


def test_paired_difference_sees_a_consistent_gain_that_separate_intervals_miss():
    rng = np.random.default_rng(3)
    base = (rng.random((3, 300)) < 0.5).astype(float)
    better = base.copy()
    flip = (base == 0) & (rng.random(base.shape) < 0.08)  # the second model fixes ~4% of the queries, breaks none
    better[flip] = 1.0
    a, b = bootstrap_interval(better), bootstrap_interval(base)
    assert a.overlaps(b)
    diff = paired_difference(better, base)
    assert diff.lo > 0 and diff.mean == pytest.approx(better.mean() - base.mean())


def test_interval_helpers():
    a, b = Interval(0.5, 0.4, 0.6), Interval(0.7, 0.61, 0.8)
    assert not a.overlaps(b) and a.overlaps(Interval(0.6, 0.55, 0.7))
    assert str(a) == "0.500 [0.400, 0.600]" and a.as_dict() == {"mean": 0.5, "lo": 0.4, "hi": 0.6}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bootstrap_interval(np.zeros((0, 5))), r"values must be \(seeds, queries\)"),
        (lambda: bootstrap_interval(np.zeros((2, 2, 2))), r"got shape \(2, 2, 2\)"),
        (lambda: bootstrap_interval([0.0, float("nan")]), "NaN or infinity"),
        (lambda: bootstrap_interval([0.0, 1.0], level=95), r"level=95; expected a confidence level in \(0, 1\)"),
        (lambda: bootstrap_interval([0.0, 1.0], n_boot=10), "at least 100 replicates"),
        (lambda: paired_difference(np.zeros((2, 3)), np.zeros((3, 3))), r"same \(seeds, queries\) shape"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
