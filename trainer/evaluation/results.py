"""Evaluation results: what the engines compute, flat metric names, and the JSON form.

Flat names have no ``@`` or ``=`` (MLflow and Ray Tune friendly): ``<suite>/<setting>/<metric>[/<lang>]``,
e.g. ``xquad_r/multi/map``, ``xquad_r/cross/map/ar_de``, ``xquad_r/bias/rank_distance``; the format and the
functions that build and read them are :mod:`xling.api.metrics`. The results files keep their own keys
(``multi.map``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xling.api.metrics import flat_name, suite_prefix
from xling.trainer.evaluation.trec import RankedLists

#: Per-query-language bias views, in table order (see docs/evaluation.md).
BIAS_METRICS = (
    "rank_distance",
    "top10_own_share",
    "pool_own_share",
    "own_first",
    "own_first_chance",
    "same_lang_gap",
    "strong_alignment",
    "own_rank_median",
    "best_other_rank_median",
)
#: The bias views that need the pooled rank of every positive, so exact ranks (the flat index). Read off
#: an approximate top-k list they would skip the queries with a positive beyond the cut-off, the most
#: biased ones, so with IVF/HNSW they are reported as not available instead.
EXACT_BIAS_METRICS = tuple(m for m in BIAS_METRICS if m not in ("top10_own_share", "pool_own_share"))


def mean(values: Any) -> float:
    """Mean over the defined (non-NaN) values; NaN when there are none, without a warning."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def json_number(x: float) -> float | None:
    """JSON has no NaN or infinity: both become null."""
    return float(x) if math.isfinite(x) else None


@dataclass
class LareqaResults:
    """XQuAD-R / MLQA-R results. Matrices are indexed [query language, candidate language]."""

    suite: str
    languages: list[str]
    candidate_context: str
    index: str
    exact: bool
    depth: int
    n_queries: dict[str, int]
    n_candidates: dict[str, int]
    map_matrix: np.ndarray
    r1_matrix: np.ndarray
    multi_map: np.ndarray
    multi_r10: np.ndarray
    bias: dict[str, dict[str, float]]
    fingerprints: dict[str, str]
    timings: dict[str, float]
    #: Per query (plots, paired significance tests): query-language index, multilingual AP, and the
    #: pooled ranks of the same-language and of the best other-language positive.
    per_query: dict[str, np.ndarray] = field(repr=False)
    ranked: list[RankedLists] = field(repr=False)

    @property
    def unavailable(self) -> list[str]:
        """Metrics this evaluation could not compute (NaN in every view, absent from the flat names)."""
        return [] if self.exact else [f"bias.{m}" for m in EXACT_BIAS_METRICS]

    @property
    def unavailable_reason(self) -> str | None:
        if self.exact:
            return None
        return (
            f"they need exact ranks over the full pool (index flat), not {self.index} top-{self.depth} lists"
        )

    def summary(self) -> dict[str, float]:
        """Macro averages over query languages (cross: over ordered pairs)."""
        off = ~np.eye(len(self.languages), dtype=bool)
        out = {
            "mono.map": mean(np.diag(self.map_matrix)),
            "mono.r1": mean(np.diag(self.r1_matrix)),
            "cross.map": mean(self.map_matrix[off]),
            "cross.r1": mean(self.r1_matrix[off]),
            "multi.map": mean(self.multi_map),
            "multi.r10": mean(self.multi_r10),
        }
        for name in BIAS_METRICS:
            out[f"bias.{name}"] = mean([self.bias[lang][name] for lang in self.languages])
        return out

    def per_language(self) -> dict[str, dict[str, float]]:
        """Per query language: mono, cross (mean over the targets), multi and bias values."""
        off = ~np.eye(len(self.languages), dtype=bool)
        out = {}
        for i, lang in enumerate(self.languages):
            row = {
                "mono.map": float(self.map_matrix[i, i]),
                "mono.r1": float(self.r1_matrix[i, i]),
                "cross.map": mean(self.map_matrix[i][off[i]]),
                "cross.r1": mean(self.r1_matrix[i][off[i]]),
                "multi.map": float(self.multi_map[i]),
                "multi.r10": float(self.multi_r10[i]),
            }
            row.update({f"bias.{k}": v for k, v in self.bias[lang].items()})
            out[lang] = row
        return out

    def flat_metrics(self, prefix: str | None = None) -> dict[str, float]:
        """Every number under its flat name; undefined values (NaN, inf) are left out."""
        p = prefix or suite_prefix(self.suite)
        out = {flat_name(p, k): v for k, v in self.summary().items()}
        for lang, row in self.per_language().items():
            out.update({flat_name(p, key, lang): value for key, value in row.items()})
        for i, x in enumerate(self.languages):
            for j, y in enumerate(self.languages):
                if i != j:
                    out[flat_name(p, "cross.map", f"{x}_{y}")] = float(self.map_matrix[i, j])
                    out[flat_name(p, "cross.r1", f"{x}_{y}")] = float(self.r1_matrix[i, j])
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN and infinity become null)."""

        def matrix(m: np.ndarray) -> dict[str, dict[str, float | None]]:
            return {
                x: {y: json_number(m[i, j]) for j, y in enumerate(self.languages)}
                for i, x in enumerate(self.languages)
            }

        return {
            "suite": self.suite,
            "languages": self.languages,
            "candidate_context": self.candidate_context,
            "index": self.index,
            "exact": self.exact,
            "depth": self.depth,
            "unavailable": {"metrics": self.unavailable, "reason": self.unavailable_reason},
            "n_queries": self.n_queries,
            "n_candidates": self.n_candidates,
            "pool_size": sum(self.n_candidates.values()),
            "summary": {k: json_number(v) for k, v in self.summary().items()},
            "per_language": {
                lang: {k: json_number(v) for k, v in row.items()} for lang, row in self.per_language().items()
            },
            "map_matrix": matrix(self.map_matrix),
            "r1_matrix": matrix(self.r1_matrix),
            "fingerprints": self.fingerprints,
            "timings": self.timings,
        }


@dataclass
class MiraclResults:
    """MIRACL: monolingual nDCG@10 and Recall@100 per language (trec_eval -c -M 100 semantics)."""

    suite: str
    languages: list[str]
    index: str
    n_queries: dict[str, int]
    n_candidates: dict[str, int]
    scores: dict[str, dict[str, float]]  # language -> {"ndcg10": .., "recall100": ..}
    fingerprints: dict[str, str]
    timings: dict[str, float]
    ranked: list[RankedLists] = field(repr=False)

    def summary(self) -> dict[str, float]:
        names = ("ndcg10", "recall100")
        return {n: mean([self.scores[lang][n] for lang in self.languages]) for n in names}

    def flat_metrics(self, prefix: str | None = None) -> dict[str, float]:
        p = prefix or suite_prefix(self.suite)
        out = {flat_name(p, k): v for k, v in self.summary().items()}
        for lang, row in self.scores.items():
            out.update({flat_name(p, k, lang): v for k, v in row.items()})
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "languages": self.languages,
            "index": self.index,
            "n_queries": self.n_queries,
            "n_candidates": self.n_candidates,
            "summary": {k: json_number(v) for k, v in self.summary().items()},
            "per_language": {
                lang: {k: json_number(v) for k, v in row.items()} for lang, row in self.scores.items()
            },
            "fingerprints": self.fingerprints,
            "timings": self.timings,
        }


SuiteResults = LareqaResults | MiraclResults
