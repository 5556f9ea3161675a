"""Paired bootstrap over examples: is model B better than model A on this test set?

Both models answered the same examples, so the examples are resampled together and the
confidence interval is for the difference of means. That is much tighter than comparing
two separate intervals, because per-example difficulty cancels out.
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a: list[float], b: list[float], *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0, lower_is_better: bool = False) -> dict[str, float]:
    """Mean(b) - mean(a) with a percentile CI, and the share of resamples where b is not better
    than a (a one-sided bootstrap p-value for "b is better"): b <= a, or b >= a for a metric
    where lower is better (loss, perplexity)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired bootstrap needs two equal, non-empty score lists (got {a.size} and {b.size})")
    diff = b - a
    rng = np.random.default_rng(seed)
    # (n_resamples, n) indices -> n_resamples means of the resampled differences.
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"delta": float(diff.mean()), "low": float(lo), "high": float(hi),
            "p_not_better": float((means >= 0).mean() if lower_is_better else (means <= 0).mean())}


def bootstrap_mean_ci(x: list[float], *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile CI of one model's mean score."""
    x = np.asarray(x, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def resample_indices(n: int, *, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) example indices drawn with replacement: one shared draw, so two systems
    resampled with the same seed are resampled on the same examples (a paired bootstrap)."""
    if n <= 0:
        raise ValueError("a bootstrap needs at least one example")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))

def bootstrap_gap_ci(a: list[float], b: list[float], *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile CI of mean(a) - mean(b) for two independent groups (two slices of one test
    set: different examples, so each group is resampled on its own, unlike ``paired_bootstrap``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"a gap needs two non-empty groups (got {a.size} and {b.size})")
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1)
    means_b = b[rng.integers(0, b.size, size=(n_resamples, b.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means_a - means_b, [tail, 1 - tail])
    return float(lo), float(hi)
