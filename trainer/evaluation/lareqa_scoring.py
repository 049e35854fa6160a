"""Evaluate an encoder on a LAReQA suite: mono, cross and multi settings plus language bias.

One pass per query language scores it against the whole pool. With the flat index the ranks of all
relevant items are exact over the full pool and the top-k lists (run files, top-k language share)
come from the same scores (``ranking.exact_ranks``). With IVF/HNSW every setting searches its own
index: multi the pooled one, mono and cross each candidate language's own (its top-``depth`` is that
language's ranking, which a pooled top-``depth`` list cuts short), so AP is AP@depth of each setting.
The bias views that need every positive's pooled rank (``results.EXACT_BIAS_METRICS``) are then not
computed: reading them off truncated lists would keep only the queries whose positives all made the
cut, the least biased ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from xling.api.errors import InputError
from xling.api.spec.base import IndexKind
from xling.trainer.evaluation import metrics
from xling.trainer.evaluation.cache import encode_cached
from xling.trainer.evaluation.centering import LanguageMeans
from xling.trainer.evaluation.lareqa import CLUSTER_UNITS, LareqaSuite
from xling.trainer.evaluation.protocol import TextEncoder
from xling.trainer.evaluation.ranking import exact_ranks, list_ranks
from xling.trainer.evaluation.results import BIAS_METRICS, LareqaResults, mean
from xling.trainer.evaluation.search import build_index, search
from xling.trainer.evaluation.trec import RankedLists

#: k of the "share of top-k hits in the query's language" bias view, and of multilingual recall.
TOP_K = 10


def _bias(
    ranks: np.ndarray,
    suite: LareqaSuite,
    own: int,
    per_query: dict[str, np.ndarray],
    exact: bool,
) -> dict[str, float]:
    """The language-bias views of one query language (see docs/evaluation.md), from the per-query arrays
    where there are some; without exact ranks only those read off the top-k list, the others NaN."""
    lang = suite.languages[own]
    own_rank, best_other = per_query["own_rank"], per_query["best_other_rank"]
    values = {
        "top10_own_share": mean(per_query["top10_own_share"]),
        "pool_own_share": len(suite.data[lang].candidate_ids) / suite.pool_size,
    }
    if exact:
        both = ~np.isnan(own_rank) & ~np.isnan(best_other)
        n_rel = np.sum(~np.isnan(ranks), axis=1)
        values |= {
            "rank_distance": mean(per_query["rank_distance"]),
            "own_first": mean(np.where(both, own_rank < best_other, np.nan)),
            "own_first_chance": mean(np.where(both, 1.0 / np.maximum(n_rel, 1), np.nan)),
            "same_lang_gap": mean(metrics.same_language_gap(ranks, own)),
            "strong_alignment": mean(metrics.strong_alignment(ranks)),
            "own_rank_median": float(np.median(own_rank[both])) if both.any() else np.nan,
            "best_other_rank_median": float(np.median(best_other[both])) if both.any() else np.nan,
        }
    return {name: values.get(name, np.nan) for name in BIAS_METRICS}


def _block_means(block_ap: np.ndarray, block_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate language: mean AP and R@1 over the queries that have a relevant item there."""
    hit = np.where(np.isnan(block_rank), np.nan, block_rank == 1)
    return np.array([mean(c) for c in block_ap.T]), np.array([mean(c) for c in hit.T])


@dataclass
class _LanguageRow:
    """Everything one query language contributes to the results."""

    map_row: np.ndarray
    r1_row: np.ndarray
    multi_map: float
    multi_r10: float
    bias: dict[str, float]
    per_query: dict[str, np.ndarray]
    ranked: RankedLists


def _language_row(
    suite: LareqaSuite,
    i: int,
    relevant: np.ndarray,
    ranks: tuple[np.ndarray, np.ndarray],
    top: tuple[np.ndarray, np.ndarray],
    depth: int,
    exact: bool,
    clusters: dict[str, dict[str, int]],
) -> _LanguageRow:
    lang = suite.languages[i]
    pool_rank, block_rank = ranks
    scores, ids = top
    with np.errstate(divide="ignore"):
        block_ap = 1.0 / block_rank  # one relevant item per language: AP = 1/rank (0 if not retrieved)
    map_row, r1_row = _block_means(block_ap, block_rank)
    multi_ap = metrics.average_precision(pool_rank)
    own_rank, best_other = metrics.own_and_best_other(pool_rank, i)
    if not exact:  # positions in a truncated list, not ranks: nothing per query to compare
        own_rank, best_other = np.full_like(own_rank, np.nan), np.full_like(best_other, np.nan)
    doc_ids = suite.pool_ids
    qids = [f"{lang}:{q}" for q in suite.data[lang].query_ids]
    per_query = {
        "language": np.full(len(qids), i),
        "multi_ap": multi_ap,
        "block_ap": block_ap,
        "own_rank": own_rank,
        "best_other_rank": best_other,
        "rank_distance": metrics.rank_distance(pool_rank) if exact else np.full(len(qids), np.nan),
        "top10_own_share": metrics.top_k_language_share(ids, suite.candidate_language, i, TOP_K),
        **{unit: np.array([of[q] for q in suite.data[lang].query_ids]) for unit, of in clusters.items()},
    }
    return _LanguageRow(
        map_row=map_row,
        r1_row=r1_row,
        multi_map=mean(multi_ap),
        multi_r10=mean(metrics.recall_at(pool_rank, TOP_K)),
        bias=_bias(pool_rank, suite, i, per_query, exact),
        per_query=per_query,
        ranked=RankedLists(
            query_ids=qids,
            doc_ids=doc_ids,
            ids=ids[:, :depth],
            scores=scores[:, :depth],
            qrels={q: {doc_ids[r]: 1 for r in row if r >= 0} for q, row in zip(qids, relevant, strict=True)},
        ),
    )


def _block_list_ranks(
    blocks: list[faiss.Index], bounds: np.ndarray, queries: np.ndarray, relevant: np.ndarray, k: int
) -> np.ndarray:
    """Mono/cross ranks with an approximate index: each relevant item's position in the top-``k`` of
    its own language's index (``blocks``, local ids; ``bounds``: where each language starts in the pool)."""
    ranks = np.empty(relevant.shape)
    for j, block in enumerate(blocks):
        _, local = search(block, queries, k)
        ids = np.where(local >= 0, local + bounds[j], -1)
        ranks[:, j] = list_ranks(ids, relevant[:, j : j + 1])[:, 0]
    return ranks


def encode_suite(
    suite: LareqaSuite, encoder: TextEncoder, cache_dir: str | Path | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Candidate and query embeddings of every language, through the cache."""
    cands, queries = [], []
    for lang in suite.languages:
        data, tag = suite.data[lang], f"{suite.name}.{lang}"
        context_tag = f"{tag}.{suite.candidate_context}"
        cands.append(
            encode_cached(encoder, data.candidate_texts, "passage", tag=context_tag, cache_dir=cache_dir)
        )
        queries.append(
            encode_cached(encoder, data.query_texts, "query", tag=f"{tag}.questions", cache_dir=cache_dir)
        )
    return cands, queries


def evaluate_lareqa(
    suite: LareqaSuite,
    encoder: TextEncoder,
    *,
    index: IndexKind = "flat",
    cache_dir: str | Path | None = None,
    depth: int = 100,
    centering: LanguageMeans | None = None,
) -> LareqaResults:
    """Encode (or read from the cache) every language, then score all settings; with ``centering``, each
    language's mean is subtracted first (the language-mean centering baseline)."""
    t0 = time.perf_counter()
    cands, queries = encode_suite(suite, encoder, cache_dir)
    if centering is not None:
        cands = [centering.center(c, lang, "passage") for c, lang in zip(cands, suite.languages, strict=True)]
        queries = [
            centering.center(q, lang, "query") for q, lang in zip(queries, suite.languages, strict=True)
        ]
    t1 = time.perf_counter()
    pool = np.vstack(cands)
    bounds = np.cumsum([0] + [len(c) for c in cands])
    k = max(depth, TOP_K)
    exact = index == "flat"
    if suite.self_match and not exact:
        raise InputError(
            suite.name, "a parallel-sentence suite needs evaluation.index flat (its own text is ranked out)"
        )
    if not exact:
        pooled = build_index(pool, index, k)
        blocks = [build_index(c, index, k) for c in cands]
    clusters = {unit: suite.clusters(unit) for unit in CLUSTER_UNITS}
    rows = []
    for i, lang in enumerate(suite.languages):
        relevant = suite.relevant(lang)
        if exact:
            own = suite.own_copy(lang)
            pool_rank, block_rank, scores, ids = exact_ranks(queries[i], pool, relevant, bounds, k, own)
        else:
            scores, ids = search(pooled, queries[i], k)
            pool_rank = list_ranks(ids, relevant)
            block_rank = _block_list_ranks(blocks, bounds, queries[i], relevant, k)
        rows.append(
            _language_row(suite, i, relevant, (pool_rank, block_rank), (scores, ids), depth, exact, clusters)
        )
    t2 = time.perf_counter()
    langs = list(suite.languages)
    return LareqaResults(
        suite=suite.name,
        languages=langs,
        candidate_context=suite.candidate_context,
        index=index,
        exact=exact,
        depth=depth,
        n_queries={lang: len(suite.data[lang].query_ids) for lang in langs},
        n_candidates={lang: len(suite.data[lang].candidate_ids) for lang in langs},
        map_matrix=np.stack([r.map_row for r in rows]),
        r1_matrix=np.stack([r.r1_row for r in rows]),
        multi_map=np.array([r.multi_map for r in rows]),
        multi_r10=np.array([r.multi_r10 for r in rows]),
        bias={lang: r.bias for lang, r in zip(langs, rows, strict=True)},
        fingerprints={"encoder": encoder.fingerprint, "data": suite.fingerprint}
        | ({"centering": centering.source} if centering else {}),
        timings={"encode_s": t1 - t0, "score_s": t2 - t1},
        per_query={key: np.concatenate([r.per_query[key] for r in rows]) for key in rows[0].per_query},
        ranked=[r.ranked for r in rows],
    )
