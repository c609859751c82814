"""Bootstrap confidence intervals over studies, and the paired bootstrap for comparing two systems.

A metric is a function of a set of study indices (``stat(idx) -> {name: value}``), so corpus-level
metrics (BLEU from pooled n-gram counts, micro-F1 from pooled true/false positives) are recomputed
on each resample rather than averaged per study. Intervals are percentile intervals (Efron &
Tibshirani, 1993); the paired bootstrap resamples the same studies for both systems and reports
the share of resamples in which the difference changes sign (Koehn, EMNLP 2004).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Stat = Callable[[np.ndarray], dict[str, float]]


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ValueError("the bootstrap needs at least one study")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(stat: Stat, n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}``: the metric on all ``n`` studies and its percentile interval."""
    point = stat(np.arange(n))
    draws: dict[str, list[float]] = {k: [] for k in point}
    for idx in _resamples(n, resamples, seed):
        for k, v in stat(idx).items():
            draws[k].append(v)
    tail = (1 - level) / 2 * 100
    return {k: {"value": float(point[k]), "low": float(np.nanpercentile(draws[k], tail)),
                "high": float(np.nanpercentile(draws[k], 100 - tail))} for k in point}


def paired_bootstrap(stat_a: Stat, stat_b: Stat, n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
                     ) -> dict[str, dict[str, float]]:
    """System A minus system B on the same ``n`` studies (the two stats index the same studies).

    Per metric: ``a``, ``b``, ``delta``, its interval, and ``p``: the two-sided share of resamples
    whose difference is on the other side of zero from the observed one (0 when every resample
    agrees; small p = the ranking of the two systems is unlikely to be a sampling accident).
    """
    a0, b0 = stat_a(np.arange(n)), stat_b(np.arange(n))
    keys = [k for k in a0 if k in b0]
    deltas: dict[str, list[float]] = {k: [] for k in keys}
    for idx in _resamples(n, resamples, seed):
        a, b = stat_a(idx), stat_b(idx)
        for k in keys:
            deltas[k].append(a[k] - b[k])
    tail = (1 - level) / 2 * 100
    out = {}
    for k in keys:
        d = np.asarray(deltas[k])
        obs = a0[k] - b0[k]
        flipped = np.mean(d <= 0) if obs > 0 else np.mean(d >= 0) if obs < 0 else 1.0
        out[k] = {"a": float(a0[k]), "b": float(b0[k]), "delta": float(obs),
                  "low": float(np.percentile(d, tail)), "high": float(np.percentile(d, 100 - tail)),
                  "p": float(min(1.0, 2 * flipped))}
    return out
