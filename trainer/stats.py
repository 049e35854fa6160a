"""Statistics for sweeps: how sure can we be that one configuration beats another?

Two sources of noise. Training noise (initialisation, batch order, dropout) shows between seeds; test-set
noise (which questions XQuAD-R happens to hold) shows between questions. Per-query scores are not
independent draws: the translations of a question share its difficulty (ICC of per-query AP across
translations ≈ 0.66 on the zero-shot demo slice of XQuAD-R), and so, less strongly, do the questions on one
paragraph; the unit of test-set sampling is a cluster that holds whole questions: the question, or (the
sweeps' default, ``sweep.bootstrapUnit``) the paragraph or article with all its questions.

- ``mean_ci``: one point's mean over its seeds with a t-interval (training noise).
- ``welch_ci``: the difference of two points' seed means with a Welch t-interval (training noise).
- ``hierarchical_bootstrap``: differences between points with both noises: every resample redraws each
  point's seeds, then the questions (all translations of a question together); its standard error gives
  the intervals and p-values.
- ``holm``: many comparisons at once, family-wise error controlled with Holm's step-down method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xling.api.errors import InputError

#: Resamples drawn per matrix product: bounds memory at chunk x questions x seeds x strata float64.
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


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def _t_quantile(confidence: float, df: float) -> float:
    from scipy import stats as sps  # here, not at the top: `xling --help` imports this module

    return float(sps.t.ppf((1 + confidence) / 2, df))


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Student-t interval for the mean of a few seeds (NaNs, e.g. a metric a seed did not log, dropped)."""
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1)
    std = float(x.std(ddof=1))
    half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, std, n)


@dataclass(frozen=True)
class DiffCI:
    """``mean(a) - mean(b)`` with a Welch t-interval; NaN bounds when either side has fewer than 2 values."""

    diff: float
    low: float
    high: float
    df: float


def welch_ci(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> DiffCI:
    """Welch interval for a difference of seed means: the seeds of two points are separate runs, so
    neither equal variances nor a pairing by seed number is assumed."""
    x, y = _finite(a), _finite(b)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    if x.size < 2 or y.size < 2:
        return DiffCI(diff, math.nan, math.nan, math.nan)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0:
        return DiffCI(diff, diff, diff, math.inf)
    df = float((vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1)))
    half = _t_quantile(confidence, df) * se
    return DiffCI(diff, diff - half, diff + half, df)


@dataclass(frozen=True)
class PairedTest:
    """``statistic(a) - statistic(b)``: estimate, interval and two-sided p from the hierarchical bootstrap's
    standard error on ``df`` degrees of freedom, with the Welch t-interval over seeds beside it."""

    diff: float
    low: float
    high: float
    se: float
    df: float
    p_value: float
    n: int
    questions: int
    seeds: tuple[int, int]
    resamples: int
    over_seeds: DiffCI


def _codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes 0..k-1 of arbitrary labels (question ids, languages), and k."""
    values, codes = np.unique(labels, return_inverse=True)
    return codes.ravel(), len(values)


def _draw_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """rows x n: how often each of n items is drawn in each of ``rows`` resamples of size n."""
    draws = rng.integers(0, n, size=(rows, n), dtype=np.int64) + (np.arange(rows) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _macro(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Mean over strata (last axis) of per-stratum means; a stratum a resample did not draw is skipped."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(den > 0, num / den, np.nan), axis=-1)


@dataclass(frozen=True)
class _Design:
    """Where each kept query sits: its (question, stratum) cell, and the query count of every cell."""

    cell: np.ndarray
    questions: int
    strata: int
    counts: np.ndarray  # questions x strata

    def sums(self, x: np.ndarray) -> np.ndarray:
        """seeds x questions x strata: each seed's summed score per cell."""
        size = self.questions * self.strata
        return np.stack([np.bincount(self.cell, weights=row, minlength=size) for row in x]).reshape(
            len(x), self.questions, self.strata
        )


def _seed_spread(sums: np.ndarray) -> np.ndarray:
    """Seed deviations scaled by sqrt(S / (S - 1)), so that resampling S seeds with replacement gives the
    seed mean its unbiased variance s^2 / S rather than (S - 1) / S of it (nothing to scale for one seed)."""
    s = len(sums)
    if s < 2:
        return sums
    centre = sums.mean(axis=0)
    return centre + math.sqrt(s / (s - 1)) * (sums - centre)


def _replicates(
    sums: dict[str, np.ndarray], design: _Design, resamples: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each configuration's statistic in every resample: seeds drawn per configuration, then one draw of
    questions shared by all (every run is scored on the same test set, so question difficulty is common)."""
    out = {name: np.empty(resamples) for name in sums}
    flat = {
        name: np.moveaxis(_seed_spread(x), 0, 1).reshape(design.questions, -1) for name, x in sums.items()
    }
    for lo in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - lo)
        questions = _draw_counts(rng, rows, design.questions)
        den = questions @ design.counts
        for name, x in sums.items():
            seeds = _draw_counts(rng, rows, len(x)) / len(x)
            per_seed = (questions @ flat[name]).reshape(rows, len(x), design.strata)
            out[name][lo : lo + rows] = _macro(np.einsum("rs,rsl->rl", seeds, per_seed), den)
    return out


def hierarchical_bootstrap(
    scores: dict[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    questions: np.ndarray | Sequence[str],
    strata: np.ndarray | Sequence[str] | None = None,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[tuple[str, str], PairedTest]:
    """Compare configurations on per-query scores from several seeds, for each (a, b) in ``pairs``.

    ``scores`` maps a configuration to a (seeds x queries) array of per-query scores (e.g. AP), columns
    aligned on the same queries; ``questions`` gives each query's cluster (its question id, or its
    paragraph's: the translations of one question must share it) and ``strata`` its language. The statistic is the seed mean of the macro average
    over strata of per-stratum mean scores (the headline mAP). Each resample draws every configuration's
    seeds with replacement, independently (seed k of two points are unrelated runs), then the clusters
    with replacement, once for all configurations (paired: per-question difficulty cancels). Queries
    that are NaN in any configuration or seed are dropped from all.

    Interval and p-value are ``diff ± t(df) * se`` and the two-sided t-test of ``diff / se``, with ``se``
    the replicates' standard deviation and ``df`` Satterthwaite's (:func:`_satterthwaite`), not the
    replicates' percentiles: with 2-5 seeds a resampled seed mean takes few distinct values, so the
    percentiles' tails are too short (3 seeds, 1,000 simulated nulls at a nominal 5 %: 7.0 % false
    positives with seed noise half the variance, 8.1 % at three quarters; with the t reference 4.6 % and
    4.3 %). The variance is right; the df carry how little a few seeds tell about it.
    """
    names = sorted({name for pair in pairs for name in pair})
    arrays = {name: np.asarray(scores[name], dtype=np.float64) for name in names}
    n = next(iter(arrays.values())).shape[-1] if arrays else 0
    for name, x in arrays.items():
        if x.ndim != 2 or x.shape[1] != n or not len(x):
            raise ValueError(f"scores[{name!r}]: expected a (seeds x {n} queries) array, got shape {x.shape}")
    qids = np.asarray(questions)
    groups = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    for label, arr in (("questions", qids), ("strata", groups)):
        if arr.shape != (n,):
            raise ValueError(f"{label}: expected {n} values, got shape {arr.shape}")
    keep = np.logical_and.reduce([np.isfinite(x).all(axis=0) for x in arrays.values()])
    if not keep.any():
        raise InputError(None, "bootstrap: no query has a score in every configuration and seed")
    q, nq = _codes(qids[keep])
    g, ng = _codes(groups[keep])
    design = _Design(q * ng + g, nq, ng, np.bincount(q * ng + g, minlength=nq * ng).reshape(nq, ng))
    sums = {name: design.sums(x[:, keep]) for name, x in arrays.items()}
    per_seed = {name: _macro(s.sum(axis=1), design.counts.sum(axis=0)) for name, s in sums.items()}
    reps = _replicates(sums, design, resamples, np.random.default_rng(seed))
    out = {}
    for a, b in pairs:
        estimate = float(per_seed[a].mean() - per_seed[b].mean())
        se = float((reps[a] - reps[b]).std(ddof=1))
        df = _satterthwaite(se**2, [per_seed[a], per_seed[b]], nq)
        out[(a, b)] = PairedTest(
            estimate,
            *_t_interval(estimate, se, df, confidence),
            se=se,
            df=df,
            p_value=_t_p_value(estimate, se, df),
            n=int(keep.sum()),
            questions=nq,
            seeds=(len(arrays[a]), len(arrays[b])),
            resamples=resamples,
            over_seeds=welch_ci(per_seed[a], per_seed[b], confidence),
        )
    return out


def _satterthwaite(variance: float, seed_stats: list[np.ndarray], questions: int) -> float:
    """Degrees of freedom of the bootstrap variance: its seed parts (s^2 / S of each side, known on S - 1
    df each, as in Welch's test) and the rest, from the questions (questions - 1 df)."""
    parts = [(x.var(ddof=1) / x.size, x.size - 1) for x in seed_stats if x.size > 1]
    rest = max(variance - sum(v for v, _ in parts), 0.0)
    denominator = sum(v**2 / df for v, df in parts) + rest**2 / max(questions - 1, 1)
    return variance**2 / denominator if denominator > 0 else math.inf


def _t_interval(estimate: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    half = _t_quantile(confidence, df) * se
    return estimate - half, estimate + half


def _t_p_value(estimate: float, se: float, df: float) -> float:
    """Two-sided p of "no difference" for estimate / se on df degrees of freedom."""
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    from scipy import stats as sps

    return float(2 * sps.t.sf(abs(estimate) / se, df))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control for many pairwise tests)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    factors = len(p) - np.arange(len(p))
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * factors))
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()
