"""Statistics for sweeps: how sure can we be that one configuration beats another?

Two sources of noise, two tools. Training noise (initialisation, batch order) is measured by running each
point with several seeds: ``mean_ci`` gives the mean and a t-interval over them. Test-set noise (which
queries happen to be in XQuAD-R) is measured by the paired bootstrap over queries: ``paired_bootstrap``
resamples queries, scoring both configurations on the same resample, so per-query difficulty cancels.
Many comparisons at once are corrected with Holm's step-down method (``holm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples drawn per matrix product: bounds memory at chunk x queries float64 (~27 MB for XQuAD-R).
_CHUNK = 256


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds with a two-sided t-interval; ``low``/``high`` are NaN with fewer than two values."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Student-t interval for the mean of a few seeds (NaNs, e.g. a metric a seed did not log, dropped)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1)
    from scipy import stats as sps  # here, not at the top: `xling --help` imports this module

    std = float(x.std(ddof=1))
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, std, n)


@dataclass(frozen=True)
class PairedTest:
    """Paired bootstrap of ``statistic(a) - statistic(b)``: estimate, percentile interval, two-sided p."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    resamples: int


def _stratum_weights(strata: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Members of each stratum and per-item weights so that weights @ x = mean over strata of stratum means."""
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    weights = np.empty(strata.size)
    for m in members:
        weights[m] = 1.0 / (len(members) * m.size)
    return members, weights


def _bootstrap_stats(
    diffs: np.ndarray, strata: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Statistic of each column of ``diffs`` (n x m) and its bootstrap replicates (resamples x m).

    The statistic is the mean over strata of the per-stratum mean (a macro average over query languages).
    Each replicate redraws every stratum's items with replacement; all columns share the draws, so one
    count matrix and one matrix product serve every comparison.
    """
    members, weights = _stratum_weights(strata)
    weighted = diffs * weights[:, None]
    estimate = weighted.sum(axis=0)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, diffs.shape[1]))
    for lo in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - lo)
        counts = np.zeros((rows, strata.size))
        for m in members:
            draws = rng.integers(0, m.size, size=(rows, m.size), dtype=np.int32)
            draws += (np.arange(rows, dtype=np.int32) * m.size)[:, None]  # row r counts into bins r*size..
            counts[:, m] = np.bincount(draws.ravel(), minlength=rows * m.size).reshape(rows, m.size)
        out[lo : lo + rows] = counts @ weighted
    return estimate, out


def paired_bootstrap_many(
    scores: dict[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    strata: np.ndarray | None = None,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[tuple[str, str], PairedTest]:
    """Paired bootstrap over queries for each (a, b) in ``pairs``.

    ``scores`` maps a configuration to its per-query score (e.g. AP), aligned on the same queries;
    ``strata`` (e.g. the query language) makes the statistic a macro average and keeps each stratum's
    size fixed in every resample. Queries that are NaN in any configuration are dropped from all, so
    every comparison uses the same queries. The p-value tests a zero difference by shifting the
    replicates to the null: p = (1 + #{|T* - T| >= |T|}) / (1 + resamples).
    """
    names = sorted({name for pair in pairs for name in pair})
    matrix = np.column_stack([np.asarray(scores[name], dtype=np.float64) for name in names])
    keep = np.isfinite(matrix).all(axis=1)
    groups = np.zeros(len(matrix), dtype=np.int64) if strata is None else np.asarray(strata)
    if groups.shape != (len(matrix),):
        raise ValueError(f"strata: expected {len(matrix)} values, got shape {groups.shape}")
    matrix, groups = matrix[keep], groups[keep]
    if not len(matrix):
        raise ValueError("paired bootstrap: no query has a score in every configuration")
    col = {name: i for i, name in enumerate(names)}
    diffs = np.column_stack([matrix[:, col[a]] - matrix[:, col[b]] for a, b in pairs])
    estimate, reps = _bootstrap_stats(diffs, groups, resamples, seed)
    tail = (1 - confidence) / 2
    lows, highs = np.quantile(reps, [tail, 1 - tail], axis=0)
    extreme = (np.abs(reps - estimate) >= np.abs(estimate) - 1e-12).sum(axis=0)
    return {
        pair: PairedTest(
            diff=float(estimate[k]),
            low=float(lows[k]),
            high=float(highs[k]),
            p_value=float((1 + extreme[k]) / (1 + resamples)),
            n=len(matrix),
            resamples=resamples,
        )
        for k, pair in enumerate(pairs)
    }


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """One comparison: per-query scores ``a`` and ``b`` of two configurations on the same queries."""
    return paired_bootstrap_many(
        {"a": a, "b": b}, [("a", "b")], strata, resamples=resamples, confidence=confidence, seed=seed
    )[("a", "b")]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control for many pairwise tests)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    factors = len(p) - np.arange(len(p))
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * factors))
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()
