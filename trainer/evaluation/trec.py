"""TREC run and qrels files, and a scorer with trec_eval's semantics, so any run we write can be
re-scored by trec_eval / ir_measures and by us alike.

trec_eval semantics kept here: a run is re-sorted by score, ties broken by doc id *descending*; the
rank column is ignored; ``depth`` is ``-M``; every query in the qrels counts, an unanswered one
scores zero (``-c``); relevant means grade >= 1; nDCG gains are the grades. Unlike some toolkits,
a retrieved doc whose id equals the query id is never dropped (that under-reported MIRACL for BGE-M3).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xling.trainer.evaluation.errors import EvalDataError

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


@dataclass
class RankedLists:
    """Top-k lists of a set of queries over one candidate list, and their relevance judgements."""

    query_ids: list[str]
    doc_ids: Sequence[str]
    ids: np.ndarray  # (queries, k) candidate indices, -1 = empty slot
    scores: np.ndarray  # (queries, k)
    qrels: Qrels

    def run_lines(self, tag: str) -> Iterator[str]:
        for qid, row_ids, row_scores in zip(self.query_ids, self.ids, self.scores, strict=True):
            rank = 0
            for idx, score in zip(row_ids, row_scores, strict=True):
                if idx >= 0:
                    rank += 1
                    # 9 significant digits round-trip float32, so no ties appear that the index did not see.
                    yield f"{qid} Q0 {self.doc_ids[idx]} {rank} {float(score):.9g} {tag}\n"

    def to_run(self) -> Run:
        return {
            qid: {self.doc_ids[i]: float(s) for i, s in zip(ids, scores, strict=True) if i >= 0}
            for qid, ids, scores in zip(self.query_ids, self.ids, self.scores, strict=True)
        }


def write_run(lists: Iterable[RankedLists], path: str | Path, tag: str = "xling") -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for part in lists:
            fh.writelines(part.run_lines(tag))


def write_qrels(lists: Iterable[RankedLists], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for part in lists:
            for qid, docs in part.qrels.items():
                fh.writelines(f"{qid} 0 {doc} {grade}\n" for doc, grade in docs.items())


def _rows(path: str | Path, width: int) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != width:
                raise EvalDataError(
                    path, f"expected {width} fields, got {len(fields)}: {line.strip()!r}", line=n
                )
            yield n, fields


def read_run(path: str | Path) -> Run:
    """``qid Q0 docid rank score tag`` lines; a doc listed twice for one query is an error."""
    run: Run = defaultdict(dict)
    for n, (qid, _, doc, _, score, _) in _rows(path, 6):
        if doc in run[qid]:
            raise EvalDataError(path, f"doc {doc!r} listed twice for query {qid!r}", line=n)
        try:
            run[qid][doc] = float(score)
        except ValueError:
            raise EvalDataError(path, f"score {score!r} is not a number", line=n) from None
    return dict(run)


def read_qrels(path: str | Path) -> Qrels:
    """``qid iteration docid grade`` lines (TREC qrels; MIRACL's use tabs, which split the same)."""
    qrels: Qrels = defaultdict(dict)
    for n, (qid, _, doc, grade) in _rows(path, 4):
        try:
            qrels[qid][doc] = int(grade)
        except ValueError:
            raise EvalDataError(path, f"grade {grade!r} is not an integer", line=n) from None
    return dict(qrels)


def _ranked(docs: Mapping[str, float], depth: int | None) -> list[str]:
    # Sort by doc id descending, then stably by score descending: trec_eval's order.
    order = sorted(docs, reverse=True)
    order.sort(key=lambda d: docs[d], reverse=True)
    return order[:depth]


def _query_scores(ranked: list[str], judged: Mapping[str, int], measures: Sequence[str]) -> dict[str, float]:
    grades = [max(judged.get(d, 0), 0) for d in ranked]
    n_rel = sum(1 for g in judged.values() if g >= 1)
    out: dict[str, float] = {}
    for measure in measures:
        name, _, cut = measure.rpartition("_") if measure[-1].isdigit() else (measure, "", "")
        k = int(cut) if cut else len(ranked)
        if name == "map":
            hits, total = 0, 0.0
            for i, g in enumerate(grades, 1):
                if g >= 1:
                    hits += 1
                    total += hits / i
            out[measure] = total / n_rel if n_rel else 0.0
        elif name == "recall":
            out[measure] = sum(g >= 1 for g in grades[:k]) / n_rel if n_rel else 0.0
        elif name == "ndcg_cut":
            dcg = sum(g / math.log2(i + 1) for i, g in enumerate(grades[:k], 1))
            ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
            idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, 1))
            out[measure] = dcg / idcg if idcg else 0.0
        else:
            raise ValueError(f"unknown measure {measure!r} (map, recall_K, ndcg_cut_K)")
    return out


def score_run(
    run: Run, qrels: Qrels, measures: Sequence[str] = ("map",), depth: int | None = None
) -> dict[str, dict[str, float]]:
    """Per-query scores for every query in ``qrels`` (``-c``), in trec_eval's ``-M depth`` semantics."""
    return {
        qid: _query_scores(_ranked(run.get(qid, {}), depth), judged, measures)
        for qid, judged in qrels.items()
    }


def mean_scores(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each measure over queries (trec_eval's ``all`` line)."""
    if not per_query:
        return {}
    measures = next(iter(per_query.values())).keys()
    return {m: float(np.mean([q[m] for q in per_query.values()])) for m in measures}
