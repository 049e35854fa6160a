"""Per-query metrics from rank arrays (see ``ranking``): NaN = no relevant item, inf = not retrieved.

Everything here is per query; averaging per query language and then over languages (macro) is the
caller's job, so each metric is written once.
"""

from __future__ import annotations

import numpy as np


def average_precision(ranks: np.ndarray) -> np.ndarray:
    """AP per row: mean over relevant items of (relevant ranked at or above it) / its rank.

    Unretrieved items (inf) add zero but still count in the denominator, as in trec_eval.
    """
    ranks = np.atleast_2d(ranks)
    relevant = ~np.isnan(ranks)
    r = np.where(relevant, ranks, np.inf)
    hits = np.sum(r[:, None, :] <= r[:, :, None], axis=2)
    contrib = np.where(np.isfinite(r), hits / np.where(np.isfinite(r), r, 1.0), 0.0)
    n_rel = relevant.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(n_rel > 0, contrib.sum(axis=1) / n_rel, np.nan)


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Share of each row's relevant items ranked in the top k (NaN where a row has none)."""
    ranks = np.atleast_2d(ranks)
    relevant = ~np.isnan(ranks)
    n_rel = relevant.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(n_rel > 0, np.sum(relevant & (ranks <= k), axis=1) / n_rel, np.nan)


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Max minus min rank over each row's relevant set (HB / KD-SPD language bias); NaN when a row
    has fewer than two relevant items or one was not retrieved."""
    relevant = ~np.isnan(ranks)
    ok = (relevant.sum(axis=1) >= 2) & ~np.isinf(ranks).any(axis=1)
    hi = np.where(relevant, ranks, -np.inf).max(axis=1)
    lo = np.where(relevant, ranks, np.inf).min(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(ok, hi - lo, np.nan)


def own_and_best_other(ranks: np.ndarray, own: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the same-language positive (column ``own``) and of the best other-language one."""
    other = np.delete(ranks, own, axis=1)
    best = np.where(np.isnan(other), np.inf, other).min(axis=1)
    return ranks[:, own], np.where(np.isnan(other).all(axis=1), np.nan, best)


def same_language_gap(ranks: np.ndarray, own: int) -> np.ndarray:
    """Mean other-language positive rank minus the same-language one (> 0: prefers its own language);
    NaN when a positive was not retrieved."""
    other = np.delete(ranks, own, axis=1)
    count = np.sum(~np.isnan(other), axis=1)
    ok = (count > 0) & ~np.isinf(ranks).any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, np.nansum(other, axis=1) / np.maximum(count, 1) - ranks[:, own], np.nan)


def top_k_language_share(ids: np.ndarray, candidate_language: np.ndarray, own: int, k: int) -> np.ndarray:
    """Share of each query's top-k hits that are in the query's own language."""
    top = ids[:, :k]
    langs = np.where(top >= 0, candidate_language[np.maximum(top, 0)], -1)
    return np.sum(langs == own, axis=1) / max(1, top.shape[1])


def strong_alignment(ranks: np.ndarray) -> np.ndarray:
    """1 where every relevant item outranks every irrelevant one (LAReQA's strong alignment)."""
    relevant = ~np.isnan(ranks)
    worst = np.where(relevant, ranks, -np.inf).max(axis=1)
    return (worst <= relevant.sum(axis=1)).astype(np.float64)
