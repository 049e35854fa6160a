"""MIRACL: monolingual passage retrieval scored like the official trec_eval ``-c -M 100`` call.

Files, as MIRACL distributes them, anywhere under the suite directory:
``topics.miracl-v1.0-<lang>-dev.tsv`` (qid TAB query), ``qrels.miracl-v1.0-<lang>-dev.tsv`` (TREC
qrels) and ``miracl-corpus-v1.0-<lang>/*.jsonl[.gz]`` ({"docid", "title", "text"} per line).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from xling.api.spec.base import IndexKind
from xling.trainer.evaluation.cache import encode_cached
from xling.trainer.evaluation.errors import EvalDataError
from xling.trainer.evaluation.protocol import TextEncoder
from xling.trainer.evaluation.results import MiraclResults
from xling.trainer.evaluation.search import build_index, search
from xling.trainer.evaluation.trec import Qrels, RankedLists, mean_scores, read_qrels, score_run

SPLIT = "dev"
#: trec_eval -M: the official MIRACL scores look at the top 100 only.
DEPTH = 100
MEASURES = {"ndcg_cut_10": "ndcg10", "recall_100": "recall100"}


@dataclass(frozen=True)
class MiraclLanguage:
    language: str
    query_ids: list[str]
    query_texts: list[str]
    doc_ids: list[str]
    doc_texts: list[str]
    qrels: Qrels


@dataclass(frozen=True)
class MiraclSuite:
    name: str
    languages: tuple[str, ...]
    data: dict[str, MiraclLanguage]
    fingerprint: str


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.rglob(pattern))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files"
        raise EvalDataError(directory, f"{what} matching {pattern!r}")
    return found[0]


def _read_topics(path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        qid, sep, text = line.partition("\t")
        if not sep or not qid or not text.strip():
            raise EvalDataError(path, f"expected 'qid<TAB>query', got {line!r}", line=n)
        ids.append(qid)
        texts.append(text.strip())
    return ids, texts


def _read_corpus(directory: Path) -> tuple[list[str], list[str]]:
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise EvalDataError(directory, "no .jsonl or .jsonl.gz corpus files")
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    docid, text, title = str(doc["docid"]), doc["text"], doc.get("title") or ""
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise EvalDataError(
                        path, f"not a {{docid, title, text}} record ({err!r})", line=n
                    ) from None
                if docid in seen:
                    raise EvalDataError(path, f"duplicate docid {docid!r}", line=n)
                seen.add(docid)
                ids.append(docid)
                texts.append(f"{title} {text}".strip())
    return ids, texts


def load_miracl(
    directory: str | Path,
    *,
    languages: list[str] | None = None,
    max_queries: int | None = None,
    max_passages: int | None = None,
) -> MiraclSuite:
    """Load MIRACL dev files. ``max_passages`` keeps the first N passages plus every passage judged
    for a kept query (a cheap stand-in for the full corpus, like MIRACL's hard-negative subsets)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalDataError(directory, "not a directory")
    if languages is None:
        found = directory.rglob(f"topics.miracl-v1.0-*-{SPLIT}.tsv")
        languages = sorted(p.name.removeprefix("topics.miracl-v1.0-").split("-")[0] for p in found)
        if not languages:
            raise EvalDataError(directory, f"no topics.miracl-v1.0-<lang>-{SPLIT}.tsv files")
    digest = hashlib.sha256(f"{max_queries}|{max_passages}".encode())
    data = {}
    for lang in languages:
        topics = _one(directory, f"topics.miracl-v1.0-{lang}-{SPLIT}.tsv")
        qrels_path = _one(directory, f"qrels.miracl-v1.0-{lang}-{SPLIT}.tsv")
        corpus = _one(directory, f"miracl-corpus-v1.0-{lang}")
        qids, qtexts = _read_topics(topics)
        qids, qtexts = qids[:max_queries], qtexts[:max_queries]
        kept = set(qids)
        qrels = {q: docs for q, docs in read_qrels(qrels_path).items() if q in kept}
        doc_ids, doc_texts = _read_corpus(corpus)
        if max_passages is not None:
            judged = {d for docs in qrels.values() for d in docs}
            keep = [i for i, d in enumerate(doc_ids) if i < max_passages or d in judged]
            doc_ids, doc_texts = [doc_ids[i] for i in keep], [doc_texts[i] for i in keep]
        data[lang] = MiraclLanguage(lang, qids, qtexts, doc_ids, doc_texts, qrels)
        for path in (topics, qrels_path):
            digest.update(path.read_bytes())
        digest.update("\0".join(doc_ids).encode())
    return MiraclSuite("miracl", tuple(languages), data, digest.hexdigest()[:16])


def evaluate_miracl(
    suite: MiraclSuite,
    encoder: TextEncoder,
    *,
    index: IndexKind = "flat",
    cache_dir: str | Path | None = None,
    depth: int = DEPTH,
) -> MiraclResults:
    """Per language: encode, search the top ``max(depth, 100)``, score the top 100 like trec_eval."""
    scores: dict[str, dict[str, float]] = {}
    ranked: list[RankedLists] = []
    encode_s = search_s = 0.0
    for lang in suite.languages:
        d = suite.data[lang]
        t0 = time.perf_counter()
        docs = encode_cached(
            encoder, d.doc_texts, "passage", tag=f"miracl.{lang}.corpus", cache_dir=cache_dir
        )
        queries = encode_cached(
            encoder, d.query_texts, "query", tag=f"miracl.{lang}.topics", cache_dir=cache_dir
        )
        t1 = time.perf_counter()
        top_scores, ids = search(build_index(docs, index, depth), queries, max(depth, DEPTH))
        # Ids get a "<lang>:" prefix: MIRACL query and doc ids repeat across languages.
        lists = RankedLists(
            query_ids=[f"{lang}:{q}" for q in d.query_ids],
            doc_ids=[f"{lang}:{doc}" for doc in d.doc_ids],
            ids=ids,
            scores=top_scores,
            qrels={
                f"{lang}:{q}": {f"{lang}:{doc}": g for doc, g in docs.items()} for q, docs in d.qrels.items()
            },
        )
        means = mean_scores(score_run(lists.to_run(), lists.qrels, list(MEASURES), depth=DEPTH))
        scores[lang] = {name: means.get(measure, math.nan) for measure, name in MEASURES.items()}
        ranked.append(lists)
        encode_s += t1 - t0
        search_s += time.perf_counter() - t1
    return MiraclResults(
        suite=suite.name,
        languages=list(suite.languages),
        index=index,
        n_queries={lang: len(suite.data[lang].qrels) for lang in suite.languages},
        n_candidates={lang: len(suite.data[lang].doc_ids) for lang in suite.languages},
        scores=scores,
        fingerprints={"encoder": encoder.fingerprint, "data": suite.fingerprint},
        timings={"encode_s": encode_s, "score_s": search_s},
        ranked=ranked,
    )
