"""Statistics helpers: closed-form checks, edge cases and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from b4m.metrics.stats import Interval, bootstrap_mean, format_interval, paired_bootstrap, wilson_interval


def test_wilson_matches_hand_computation():
    # 8 of 10 at 95%: z = 1.959964, the textbook Wilson bounds are 0.4902 and 0.9433.
    k, n, z = 8, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    est, low, high = wilson_interval(k, n)
    assert est == 0.8
    assert low == pytest.approx(centre - half, abs=1e-12)
    assert high == pytest.approx(centre + half, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_wilson_ends_and_confidence():
    assert wilson_interval(0, 10).low == 0.0
    assert wilson_interval(10, 10).high == 1.0
    # At 0 successes the upper bound is z²/(n + z²).
    z = 1.959963984540054
    assert wilson_interval(0, 10).high == pytest.approx(z * z / (10 + z * z), abs=1e-12)
    assert wilson_interval(8, 10, confidence=0.99).width > wilson_interval(8, 10).width
    for bad in [(11, 10), (-1, 10), (1, 0), (1.5, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


def test_bootstrap_of_a_constant_has_zero_width():
    est, low, high = bootstrap_mean([0.1] * 7)
    assert low == high
    assert est == pytest.approx(0.1, abs=1e-15) and low == pytest.approx(0.1, abs=1e-15)


def test_bootstrap_is_seeded_and_close_to_the_normal_interval():
    x = np.random.default_rng(1).normal(0.5, 0.1, 400)
    a = bootstrap_mean(x, seed=3)
    assert a == bootstrap_mean(x, seed=3)
    assert a != bootstrap_mean(x, seed=4)
    assert a.estimate == pytest.approx(x.mean())
    assert a.low < a.estimate < a.high
    normal_width = 2 * 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert a.width == pytest.approx(normal_width, rel=0.1)


def test_groups_of_one_equal_the_item_bootstrap_and_clusters_widen():
    rng = np.random.default_rng(2)
    pair_effect = np.repeat(rng.normal(0, 0.1, 8), 16)  # 8 pairs × 16 images sharing a pair-level shift
    x = 0.5 + pair_effect + rng.normal(0, 0.02, pair_effect.size)
    assert bootstrap_mean(x, groups=list(range(x.size)), n_resamples=500) == bootstrap_mean(x, n_resamples=500)
    clustered = bootstrap_mean(x, groups=np.arange(x.size) // 16)
    assert clustered.estimate == bootstrap_mean(x).estimate
    assert clustered.width > 2 * bootstrap_mean(x).width
    with pytest.raises(ValueError, match="one label per item"):
        bootstrap_mean(x, groups=[0, 1])


def test_paired_bootstrap():
    x = np.random.default_rng(0).uniform(0.2, 0.8, 64)
    assert paired_bootstrap(x, x) == Interval(0.0, 0.0, 0.0)
    shift = paired_bootstrap(x + 0.25, x)
    assert shift.estimate == pytest.approx(0.25) and shift.width == pytest.approx(0.0, abs=1e-12)
    # The items vary far more than the methods differ: pairing removes the shared variation.
    b = x + np.random.default_rng(1).normal(0.01, 0.005, x.size)
    paired = paired_bootstrap(b, x)
    assert 0 < paired.low < paired.estimate < paired.high
    assert paired.width < bootstrap_mean(b).width / 5
    assert paired_bootstrap(b, x, seed=7) == paired_bootstrap(b, x, seed=7)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(x, x[:-1])


@pytest.mark.parametrize("bad", [[], [0.1, float("nan")], [[0.1, 0.2]]])
def test_bad_scores(bad):
    with pytest.raises(ValueError):
        bootstrap_mean(bad)


def test_format():
    assert format_interval((0.8312, 0.7781, 0.8749)) == "0.83 [0.78, 0.87]"
    assert Interval(0.0213, -0.0104, 0.0521).format(signed=True) == "+0.02 [-0.01, +0.05]"
    assert wilson_interval(8, 10).format(3) == "0.800 [0.490, 0.943]"


def _crossed_grid(rng, rows=6, cols=6, per_cell=4, row_sd=0.3, col_sd=0.3, noise_sd=0.1):
    """Scores of a rows × cols design with a random effect per row and per column (the benchmark's contents ×
    styles, whose runs every pair of the concept shares), ``per_cell`` items per cell."""
    r = rng.normal(0, row_sd, rows)
    c = rng.normal(0, col_sd, cols)
    labels = [(i, j) for i in range(rows) for j in range(cols) for _ in range(per_cell)]
    x = np.array([r[i] + c[j] + rng.normal(0, noise_sd) for i, j in labels])
    return x, [i for i, _ in labels], [j for _, j in labels], [f"{i}-{j}" for i, j in labels]


def test_crossed_bootstrap_covers_where_the_pair_bootstrap_does_not():
    # The true mean of the model is 0. Resampling pairs ignores that pairs share their row's and column's effect,
    # so its intervals miss 0 far more often than 5%; resampling rows and columns (pigeonhole) keeps coverage.
    rng = np.random.default_rng(7)
    hits = {"pairs": 0, "crossed": 0}
    trials = 150
    for t in range(trials):
        x, rows, cols, pairs = _crossed_grid(rng)
        by_pair = bootstrap_mean(x, groups=pairs, n_resamples=400, seed=t)
        by_both = bootstrap_mean(x, crossed=(rows, cols), n_resamples=400, seed=t)
        hits["pairs"] += by_pair.low <= 0.0 <= by_pair.high
        hits["crossed"] += by_both.low <= 0.0 <= by_both.high
    assert hits["crossed"] / trials >= 0.88
    assert hits["pairs"] / trials <= 0.6


def test_crossed_bootstrap_is_the_row_bootstrap_with_one_column():
    rng = np.random.default_rng(0)
    x, rows, _, _ = _crossed_grid(rng, cols=1)
    one = bootstrap_mean(x, crossed=(rows, [0] * len(x)), seed=3)
    assert one.estimate == pytest.approx(x.mean())
    by_row = bootstrap_mean(x, groups=rows, n_resamples=10_000, seed=4)
    assert one.low == pytest.approx(by_row.low, abs=0.03) and one.high == pytest.approx(by_row.high, abs=0.03)


def test_crossed_paired_differences_and_errors():
    rng = np.random.default_rng(1)
    a, rows, cols, _ = _crossed_grid(rng)
    b = a - 0.05  # the same items, a constant apart: the paired difference has no spread at all
    d = paired_bootstrap(a, b, crossed=(rows, cols))
    assert d.estimate == pytest.approx(0.05) and d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)
    assert bootstrap_mean(a, crossed=(rows, cols), seed=2) == bootstrap_mean(a, crossed=(rows, cols), seed=2)
    with pytest.raises(ValueError, match="groups or crossed"):
        bootstrap_mean(a, groups=rows, crossed=(rows, cols))
    with pytest.raises(ValueError, match="crossed rows has 3 labels"):
        bootstrap_mean(a, crossed=(rows[:3], cols))
