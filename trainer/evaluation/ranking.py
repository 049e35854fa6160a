"""Ranks of relevant candidates, the one input every LAReQA metric needs.

``relevant`` has one column per candidate language (the pool is the languages' blocks in order), so
column j holds a query's relevant candidate in language j, or -1. Two rank arrays come back, float64,
NaN where there is no relevant candidate:

- ``pool``: rank in the pooled (multilingual) ranking;
- ``block``: rank among the candidates of that language alone (monolingual / cross-lingual ranking).

Exact ranks count, over the full pool, the candidates scoring at least as high as the relevant one.
Ties therefore rank pessimistically, as scikit-learn's ``average_precision_score`` treats them, so AP
matches it exactly. One GEMM per query chunk serves the counts and the top-k lists alike, which is why
the flat setting needs no FAISS index. Approximate indexes (``list_ranks``) give positions in a top-k
list instead: +inf when not retrieved. ``lareqa_scoring`` asks each language's own index for the ``block``
ranks, because a position among one language's items in a pooled top-k list is not that language's
ranking: its items beyond the pooled cut-off are missing.
"""

from __future__ import annotations

import faiss
import numpy as np

#: Bytes of comparison results held at once while counting.
_CHUNK_BYTES = 64 << 20


def exact_ranks(
    queries: np.ndarray,
    pool: np.ndarray,
    relevant: np.ndarray,
    bounds: np.ndarray,
    depth: int = 0,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact (pool, block) ranks, plus the top-``depth`` (scores, ids) lists read off the same scores
    with FAISS's heap, so lists and ranks never disagree; ``bounds`` are the L+1 block boundaries.
    ``exclude``: per query, one pooled candidate ranked out (scored -inf: a query's own text)."""
    n, n_lang = relevant.shape
    k = min(depth, pool.shape[0])
    pool_rank = np.full((n, n_lang), np.nan)
    block_rank = np.full((n, n_lang), np.nan)
    top_scores = np.zeros((n, k), dtype=np.float32)
    top_ids = np.zeros((n, k), dtype=np.int64)
    has = relevant >= 0
    step = max(1, _CHUNK_BYTES // max(1, n_lang * pool.shape[0]))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        scores = queries[lo:hi] @ pool.T
        if exclude is not None:
            scores[np.arange(hi - lo), exclude[lo:hi]] = -np.inf
        rel = np.where(has[lo:hi], relevant[lo:hi], 0)
        # A missing relevant item gets threshold +inf, so nothing counts for it.
        thr = np.where(has[lo:hi], np.take_along_axis(scores, rel, axis=1), np.inf)
        pool_rank[lo:hi] = np.count_nonzero(scores[:, None, :] >= thr[:, :, None], axis=2)
        for j in range(n_lang):
            block = scores[:, bounds[j] : bounds[j + 1]]
            block_rank[lo:hi, j] = np.count_nonzero(block >= thr[:, j : j + 1], axis=1)
        if k:
            top_scores[lo:hi], top_ids[lo:hi] = faiss.kmax(scores, k)
    pool_rank[~has] = np.nan
    block_rank[~has] = np.nan
    return pool_rank, block_rank, top_scores, top_ids


def list_ranks(ids: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based position of each relevant item in its query's top-k list (``ids``: queries x k, -1 = empty
    slot; ``relevant``: queries x L, -1 = none): +inf when not retrieved, NaN where there is none."""
    hit = ids[:, None, :] == relevant[:, :, None]  # (n, L, k)
    ranks = np.where(hit.any(axis=2), hit.argmax(axis=2) + 1.0, np.inf)
    ranks[relevant < 0] = np.nan
    return ranks
