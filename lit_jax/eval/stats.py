"""Confidence intervals over examples.

Accuracy of 0/1 outcomes: the Wilson score interval (Wilson 1927; Brown, Cai & DasGupta
2001 recommend it over the normal approximation for small n and proportions near 0 or 1).
Anything else (fractional credit for ties, a token-weighted loss): the percentile bootstrap
over examples (Efron & Tibshirani 1993), with a fixed seed so a table is reproducible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as _stats

LEVEL = 0.95


def interval(value: float, low: float, high: float, n: int) -> dict:
    return {"value": float(value), "low": float(low), "high": float(high), "n": int(n)}


def wilson(successes: int, n: int, level: float = LEVEL) -> dict:
    """The Wilson score interval of a proportion successes / n. ValueError for n < 1."""
    if n < 1:
        raise ValueError("no examples: an interval needs n >= 1")
    ci = _stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return interval(successes / n, ci.low, ci.high, n)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float] | None = None, *,
                    level: float = LEVEL, resamples: int = 2000, seed: int = 0) -> dict:
    """sum(numerators) / sum(denominators) (default: the mean of numerators) with a percentile
    bootstrap interval resampling examples. ValueError for no examples or a zero denominator."""
    x = np.asarray(numerators, np.float64)
    d = np.ones_like(x) if denominators is None else np.asarray(denominators, np.float64)
    if x.size == 0 or x.shape != d.shape:
        raise ValueError(f"need equally many numerators and denominators, got {x.size} and {d.size}")
    if d.sum() <= 0:
        raise ValueError("the denominators sum to zero")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    ratios = x[idx].sum(1) / np.maximum(d[idx].sum(1), 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return interval(x.sum() / d.sum(), lo, hi, x.size)


def accuracy(scores: Sequence[float], level: float = LEVEL) -> dict:
    """Mean of per-example scores in [0, 1] with its interval: Wilson when every score is 0 or 1,
    else the bootstrap (fractional credit, e.g. a tie among k candidates counts 1/k)."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        raise ValueError("no examples: an interval needs n >= 1")
    if np.all((s == 0) | (s == 1)):
        return wilson(int(s.sum()), s.size, level)
    return bootstrap_ratio(s, level=level)


def separated(a: dict, b: dict) -> bool:
    """Whether interval a lies entirely above interval b (non-overlapping, a better)."""
    return a["low"] > b["high"]
