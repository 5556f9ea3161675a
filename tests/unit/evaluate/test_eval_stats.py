"""Paired bootstrap: intervals cover the true difference at about the stated rate."""

import numpy as np
import pytest

from tuneforge.evaluate.stats import bootstrap_mean_ci, paired_bootstrap


def test_paired_bootstrap_coverage_on_a_synthetic_case():
    # Per-example difficulty shared by both models; B is truly 10 points better.
    rng = np.random.default_rng(123)
    true_delta, covered, trials = 0.10, 0, 200
    for t in range(trials):
        difficulty = rng.uniform(0.2, 0.7, size=150)
        a = (rng.random(150) < difficulty).astype(float)
        b = (rng.random(150) < difficulty + true_delta).astype(float)
        r = paired_bootstrap(a, b, n_resamples=500, seed=t)
        covered += r["low"] <= true_delta <= r["high"]
    assert 0.88 <= covered / trials <= 0.99


def test_pairing_gives_a_tighter_interval_than_separate_intervals():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a + 0.05 + rng.normal(0, 0.01, 200)  # same examples, slightly better everywhere
    r = paired_bootstrap(a, b)
    assert r["low"] > 0 and r["p_not_better"] == 0.0
    lo_a, hi_a = bootstrap_mean_ci(a)
    lo_b, hi_b = bootstrap_mean_ci(b)
    assert lo_b < hi_a  # the separate intervals overlap, yet the paired one excludes 0
    assert r["delta"] == pytest.approx(float(np.mean(b - a)))


def test_no_difference_interval_contains_zero_and_bad_input_fails():
    a = [1.0, 0.0, 1.0, 0.0] * 10
    r = paired_bootstrap(a, a)
    assert r["low"] == r["high"] == r["delta"] == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_p_not_better_follows_the_metrics_direction():
    base, tuned = [2.0, 2.1, 1.9, 2.2, 2.0, 2.05], [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]  # a clearly lower tuned loss
    assert paired_bootstrap(base, tuned, lower_is_better=True)["p_not_better"] == 0.0
    assert paired_bootstrap(base, tuned)["p_not_better"] == 1.0  # read as an accuracy: worse
