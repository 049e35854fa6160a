"""MIRACL on a tiny corpus written in MIRACL's own file layout, and trec_eval semantics."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from xling.trainer.evaluation.errors import EvalDataError
from xling.trainer.evaluation.miracl import evaluate_miracl, load_miracl
from xling.trainer.evaluation.report import format_table, write_artifacts
from xling.trainer.evaluation.trec import score_run

# Doc vectors: coordinate 0 is the score for query "1", coordinate 1 the score for query "2".
DOCS = {"a": (0.9, 0.1), "1": (0.8, 0.2), "b": (0.1, 0.3), "c": (0.3, 0.05)}
QUERIES = {"1": "first question", "2": "second question", "3": "unanswerable question"}
QRELS = [("1", "1", 1), ("1", "b", 1), ("1", "a", 0), ("2", "c", 1), ("3", "not-in-corpus", 1)]


class TableEncoder:
    """Vectors chosen so that every ranking is known in advance."""

    fingerprint = "table"

    def encode(self, texts: Sequence[str], kind: str) -> np.ndarray:
        rows = []
        for text in texts:
            if kind == "query":
                x = {"first question": (1.0, 0.0), "second question": (0.0, 1.0)}.get(text, (0.6, 0.6))
            else:
                x = DOCS[text.split()[-1]]
            rows.append([*x, math.sqrt(max(0.0, 1 - x[0] ** 2 - x[1] ** 2))])
        return np.asarray(rows, dtype=np.float32)


def write_miracl(root: Path, lang: str = "sw") -> None:
    base = root / f"miracl-v1.0-{lang}"
    (base / "topics").mkdir(parents=True)
    (base / "qrels").mkdir()
    (base / "topics" / f"topics.miracl-v1.0-{lang}-dev.tsv").write_text(
        "".join(f"{q}\t{t}\n" for q, t in QUERIES.items())
    )
    (base / "qrels" / f"qrels.miracl-v1.0-{lang}-dev.tsv").write_text(
        "".join(f"{q}\tQ0\t{d}\t{g}\n" for q, d, g in QRELS)
    )
    corpus = root / f"miracl-corpus-v1.0-{lang}"
    corpus.mkdir()
    lines = [json.dumps({"docid": d, "title": "Title", "text": f"text of {d}"}) + "\n" for d in DOCS]
    (corpus / "docs-0.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))


def test_miracl_scores_match_hand_computed_trec_eval(tmp_path: Path) -> None:
    write_miracl(tmp_path)
    suite = load_miracl(tmp_path)
    assert suite.languages == ("sw",)
    res = evaluate_miracl(suite, TableEncoder())
    # q1 ranks a(0) 1(rel) c b(rel): the doc whose id equals the query id counts, as in trec_eval.
    ndcg1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg2 = 1 / math.log2(5)  # q2 ranks b 1 a c(rel)
    # q3's only relevant doc is missing from the corpus: it still counts, as zero (trec_eval -c).
    assert res.scores["sw"] == pytest.approx({"ndcg10": (ndcg1 + ndcg2) / 3, "recall100": 2 / 3})
    assert res.flat_metrics() == pytest.approx(
        {
            "miracl/ndcg10": (ndcg1 + ndcg2) / 3,
            "miracl/recall100": 2 / 3,
            "miracl/ndcg10/sw": (ndcg1 + ndcg2) / 3,
            "miracl/recall100/sw": 2 / 3,
        }  # fmt: skip
    )
    assert res.ranked[0].query_ids == ["sw:1", "sw:2", "sw:3"]
    assert "nDCG@10" in format_table(res)
    write_artifacts(res, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "table.txt"]


def test_miracl_subset_keeps_judged_passages(tmp_path: Path) -> None:
    write_miracl(tmp_path)
    suite = load_miracl(tmp_path, max_queries=1, max_passages=1)
    data = suite.data["sw"]
    assert data.query_ids == ["1"] and set(data.qrels) == {"1"}
    assert data.doc_ids == ["a", "1", "b"]  # the first passage plus those judged for query 1


def test_miracl_bad_input(tmp_path: Path) -> None:
    write_miracl(tmp_path)
    topics = tmp_path / "miracl-v1.0-sw" / "topics" / "topics.miracl-v1.0-sw-dev.tsv"
    topics.write_text("1 no tab here\n")
    with pytest.raises(EvalDataError, match=r"topics\.miracl-v1\.0-sw-dev\.tsv:1: expected 'qid<TAB>query'"):
        load_miracl(tmp_path)
    with pytest.raises(EvalDataError, match=r"no file matching 'topics\.miracl-v1\.0-fi-dev\.tsv'"):
        load_miracl(tmp_path, languages=["fi"])


def test_trec_eval_tie_breaking_depth_and_grades() -> None:
    run = {"q": {"d1": 1.0, "d2": 1.0, "d3": 0.5}}
    qrels = {"q": {"d1": 1, "d3": 2}, "missing": {"x": 1}}
    # Ties go to the larger doc id first: d2, d1, d3.
    scores = score_run(run, qrels, ["map", "recall_1", "ndcg_cut_2"])
    assert scores["q"]["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["q"]["recall_1"] == 0.0
    assert scores["q"]["ndcg_cut_2"] == pytest.approx((1 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert scores["missing"] == {"map": 0.0, "recall_1": 0.0, "ndcg_cut_2": 0.0}
    assert score_run(run, qrels, ["map"], depth=2)["q"]["map"] == pytest.approx(1 / 4)
