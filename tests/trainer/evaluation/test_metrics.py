"""Rank computation and per-query metrics on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from xling.trainer.evaluation import metrics
from xling.trainer.evaluation.protocol import checked_embeddings
from xling.trainer.evaluation.ranking import exact_ranks, list_ranks

nan, inf = np.nan, np.inf


def random_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors: 3 candidate languages of 5, 4 and 6 items; 7 queries, one relevant per language."""
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    pool, queries = unit(rng.standard_normal((15, 8))), unit(rng.standard_normal((7, 8)))
    bounds = np.array([0, 5, 9, 15])
    relevant = np.stack([rng.integers(lo, hi, 7) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    relevant[0, 1] = -1  # one query lacks a relevant item in language 1
    return queries, pool, relevant, bounds


def test_exact_ranks_count_every_candidate_at_least_as_good() -> None:
    queries, pool, relevant, bounds = random_case()
    pool_rank, block_rank, _, _ = exact_ranks(queries, pool, relevant, bounds)
    scores = queries @ pool.T
    for q in range(len(queries)):
        for j, r in enumerate(relevant[q]):
            if r < 0:
                assert np.isnan(pool_rank[q, j]) and np.isnan(block_rank[q, j])
                continue
            assert pool_rank[q, j] == np.sum(scores[q] >= scores[q, r])
            assert block_rank[q, j] == np.sum(scores[q, bounds[j] : bounds[j + 1]] >= scores[q, r])


def test_ranks_from_complete_lists_equal_exact_ranks_and_truncation_gives_inf() -> None:
    queries, pool, relevant, bounds = random_case(1)
    scores = queries @ pool.T
    pool_exact, block_exact = exact_ranks(queries, pool, relevant, bounds)[:2]
    ids = np.argsort(-scores, axis=1)
    np.testing.assert_array_equal(list_ranks(ids, relevant), pool_exact)
    expected = np.where(pool_exact <= 3, pool_exact, inf)
    np.testing.assert_array_equal(
        list_ranks(ids[:, :3], relevant), np.where(np.isnan(pool_exact), nan, expected)
    )
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):  # one language's own list
        own = lo + np.argsort(-scores[:, lo:hi], axis=1)
        np.testing.assert_array_equal(list_ranks(own, relevant[:, j : j + 1])[:, 0], block_exact[:, j])


def test_average_precision_recall_and_bias_views() -> None:
    ranks = np.array([[1.0, 3.0, nan], [inf, 2.0, 4.0], [nan, nan, nan]])
    np.testing.assert_allclose(metrics.average_precision(ranks), [(1 + 2 / 3) / 2, (1 / 2 + 2 / 4) / 3, nan])
    np.testing.assert_allclose(metrics.recall_at(ranks, 2), [0.5, 1 / 3, nan])
    np.testing.assert_allclose(metrics.rank_distance(ranks), [2.0, nan, nan])
    own, best = metrics.own_and_best_other(ranks, 1)
    np.testing.assert_array_equal(own, [3.0, 2.0, nan])
    np.testing.assert_array_equal(best, [1.0, 4.0, nan])
    np.testing.assert_allclose(metrics.same_language_gap(ranks, 1), [-2.0, nan, nan])
    np.testing.assert_array_equal(metrics.strong_alignment(np.array([[2.0, 1.0], [1.0, 3.0]])), [1.0, 0.0])
    ids = np.array([[0, 5, 6, -1], [7, 8, 1, 2]])
    language = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(metrics.top_k_language_share(ids, language, 0, 2), [0.5, 0.0])


def test_ties_rank_pessimistically_like_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    pool = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    pool_rank, *_ = exact_ranks(query, pool, np.array([[1, 3]]), np.array([0, 2, 4]))
    assert pool_rank.tolist() == [[2.0, 3.0]]
    expected = average_precision_score([0, 1, 0, 1], (query @ pool.T)[0])
    assert metrics.average_precision(pool_rank)[0] == pytest.approx(expected, abs=1e-12)


def test_encoder_output_is_checked() -> None:
    with pytest.raises(ValueError, match="not L2-normalised"):
        checked_embeddings(np.ones((2, 3)), 2, "xquad-r.en")
    with pytest.raises(ValueError, match=r"shape \(3, 2\), expected \(2, dim\)"):
        checked_embeddings(np.eye(3, 2), 2, "xquad-r.en")
    assert checked_embeddings(np.eye(2, dtype=np.float64), 2, "x").dtype == np.float32
