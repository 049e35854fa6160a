"""Hard-negative mining into a prepared corpus (``data.hardNegatives.mine``, ``xling mine FILE``).

For every passage of the corpus, the mining model ranks the passages *of the same language* for the pair's
query (the group's query in that language, else its first query language: an X-Y pair's negatives are in
its passage's language). The top ``topK`` candidates then lose every possible false negative, each rule
counted:

- ``positive``: the passage itself;
- ``translation``: a passage of the same group (a translation of the positive);
- ``conflict_key``: a passage of a group sharing a conflict key with the pair's (the same text elsewhere, a
  shared MLQA paragraph, an overlapping NTREX window);
- ``skip_top``: the first ``skipTop`` candidates the three rules above leave;
- ``score_ratio``: a candidate scoring above ``maxScoreRatio`` x the positive's score (NV-Retriever's
  positive-aware filter: it probably answers the query too).

The first ``perPair`` survivors are kept, with their scores, under ``negatives/<key>/`` of the prepared
corpus; the key covers the corpus, the mining settings and the mining model's fingerprint, so an unchanged
setup is never mined twice. Passages are encoded once per language through the evaluation's cached encoder
(``encode_cached``), on ``workers`` Ray actors when mining a large corpus on a cluster
(:mod:`~xling.trainer.sharded_encoder`), and searched with the evaluation's FAISS index (on a GPU when
there is one).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.training import MineSpec
from xling.trainer.data.index import PASSAGE, QUERY, CorpusIndex
from xling.trainer.data.prepare import Prepared
from xling.trainer.data.store import NEGATIVES, PreparedCorpus, publish_negatives
from xling.trainer.evaluation.cache import encode_cached
from xling.trainer.evaluation.protocol import TextEncoder
from xling.trainer.evaluation.search import build_index, search

RULES = ("positive", "translation", "conflict_key", "skip_top", "score_ratio")


@dataclass(frozen=True)
class Anchors:
    """Every passage member that can get negatives, and the query member that stands for its pair."""

    passages: np.ndarray  # member positions
    queries: np.ndarray  # member positions (same group)


def anchors(corpus: PreparedCorpus) -> Anchors:
    """Each passage with the group's query in its own language, else the group's first query language."""
    index = corpus.index
    flags = index.member_flags
    passages, queries = [], []
    for g in range(len(index)):
        lo, hi = int(index.member_offsets[g]), int(index.member_offsets[g + 1])
        asking = [m for m in range(lo, hi) if flags[m] & QUERY]
        for m in range(lo, hi):
            if flags[m] & PASSAGE and asking:
                passages.append(m)
                queries.append(m if flags[m] & QUERY else asking[0])
    return Anchors(np.array(passages, dtype=np.int64), np.array(queries, dtype=np.int64))


def mined(corpus: PreparedCorpus, key: str) -> dict | None:
    """The meta of negatives mined under ``key`` before, if any."""
    done = corpus.directory / NEGATIVES / key / "meta.json"
    return json.loads(done.read_text()) if done.is_file() else None


def mining_key(corpus: PreparedCorpus, settings: MineSpec, model_fingerprint: str) -> str:
    basis = {"corpus": corpus.fingerprint(), "mine": settings.model_dump(mode="json", exclude={"batch_size", "workers"}),
             "model": model_fingerprint}  # fmt: skip
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def mine(
    corpus: PreparedCorpus,
    settings: MineSpec,
    encoder: TextEncoder,
    key: str,
    cache_dir: str | Path | None = None,
) -> dict:
    """Mine into ``corpus.directory/negatives/<key>``; returns its meta (counts, timings)."""
    out = corpus.directory / NEGATIVES / key
    index = corpus.index
    n_lang = len(index.languages)
    group_of = index.member_key // n_lang
    found = anchors(corpus)
    negatives = np.full((len(group_of), settings.per_pair), -1, dtype=np.int64)
    scores = np.full((len(group_of), settings.per_pair), np.nan, dtype=np.float32)
    removed = dict.fromkeys(RULES, 0)
    encode_s = search_s = 0.0
    encoded = 0
    lang_of = index.member_key[found.passages] % n_lang
    for code, lang in enumerate(index.languages):
        mine_here, asked = found.passages[lang_of == code], found.queries[lang_of == code]
        pool = np.flatnonzero((index.member_key % n_lang == code) & (index.member_flags & PASSAGE > 0))
        if not len(mine_here) or len(pool) < 2:
            continue
        started = time.perf_counter()
        texts = [p.passage for p in corpus.read(corpus.member_row[pool])]
        pool_emb = _encode_distinct(encoder, texts, "passage", f"mine.{lang}.passages", cache_dir)
        query_texts = [p.query for p in corpus.read(corpus.member_row[asked])]
        query_emb = _encode_distinct(encoder, query_texts, "query", f"mine.{lang}.queries", cache_dir)
        encoded += len(set(texts)) + len(set(query_texts))  # distinct texts, each encoded once
        encode_s += time.perf_counter() - started
        started = time.perf_counter()
        found_scores, ids = search(build_index(pool_emb), query_emb, settings.top_k)
        search_s += time.perf_counter() - started
        where = np.searchsorted(pool, mine_here)
        positive = np.einsum("ij,ij->i", query_emb, pool_emb[where])
        for i, member in enumerate(mine_here):
            candidates = np.where(
                ids[i] >= 0, pool[np.maximum(ids[i], 0)], -1
            )  # FAISS pads short lists with -1
            kept = _filter(index, int(member), int(group_of[member]), candidates, found_scores[i],
                           float(positive[i]), group_of, settings, removed)  # fmt: skip
            for j, (candidate, score) in enumerate(kept):
                negatives[member, j], scores[member, j] = candidate, score
    meta = {"key": key, "spec": settings.model_dump(mode="json", by_alias=True), "removed": removed,
            "passages": len(found.passages), "with_negatives": int((negatives[:, 0] >= 0).sum()),
            "negatives": int((negatives >= 0).sum()), "texts": encoded, "encode_s": encode_s,
            "search_s": search_s}  # fmt: skip
    staging = out.with_name(f"{key}.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    np.save(staging / "members.npy", negatives)
    np.save(staging / "scores.npy", scores)
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    staging.rename(out)
    return meta


def _encode_distinct(
    encoder: TextEncoder, texts: list[str], kind: str, tag: str, cache_dir: str | Path | None
) -> np.ndarray:
    """Embeddings of ``texts``, each distinct text encoded once (an MLQA paragraph answers several questions)."""
    first: dict[str, int] = {}
    inverse = np.array([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
    return encode_cached(encoder, list(first), kind, tag=tag, cache_dir=cache_dir)[inverse]


def _filter(
    index: CorpusIndex, member: int, group: int, candidates: np.ndarray, candidate_scores: np.ndarray, positive: float,
    group_of: np.ndarray, settings: MineSpec, removed: dict[str, int],
) -> list[tuple[int, float]]:  # fmt: skip
    """The kept (member, score) negatives of one passage, best first; what each rule removed is counted."""
    own_keys = set(index.keys(group))
    kept, skipped = [], 0
    for candidate, score in zip(candidates.tolist(), candidate_scores.tolist(), strict=True):
        if candidate < 0:
            continue
        other = int(group_of[candidate])
        rule = ("positive" if candidate == member else "translation" if other == group
                else "conflict_key" if not own_keys.isdisjoint(index.keys(other))
                else "skip_top" if skipped < settings.skip_top
                else "score_ratio" if score > settings.max_score_ratio * positive else None)  # fmt: skip
        if rule == "skip_top":
            skipped += 1
        if rule is not None:
            removed[rule] += 1
            continue
        if len(kept) < settings.per_pair:
            kept.append((candidate, score))
    return kept


@contextmanager
def mining_encoder(
    path: str, spec: ExperimentSpec, settings: MineSpec, model_root: str | None = None
) -> Iterator[TextEncoder]:
    """The mining model in this process, or on ``settings.workers`` Ray actors (Ray must be started), on
    GPUs when the run's workers train on them, freed when mining ends so that training gets the GPUs. With
    ``model_root`` (the actors run on other nodes) a model on this machine's disk is staged there first."""
    if settings.workers == 1:
        from xling.trainer.model import encoder_for

        yield encoder_for(path, spec.model, settings.batch_size)
        return
    from xling.api.contracts import staged_model_cache_dir
    from xling.trainer.model import stage_model
    from xling.trainer.sharded_encoder import ShardedEncoder

    gpus = spec.distributed.gpus_per_worker > 0
    staged = stage_model(path, model_root, staged_model_cache_dir()) if model_root else None
    encoder = ShardedEncoder(path, spec.model, settings.batch_size, settings.workers, gpus, staged)
    try:
        yield encoder
    finally:
        encoder.close()


def mine_prepared(
    prepared: Prepared,
    spec: ExperimentSpec,
    tiny_texts: list[str] | None = None,
    model_root: str | None = None,
) -> Prepared:
    """Mine ``spec.data.hardNegatives.mine`` into the prepared corpus (once per key, uploaded beside a
    corpus in a bucket); the result's location and corpus carry the negatives. ``model_root``: where to
    stage the model for mining actors on other nodes (:func:`mining_encoder`)."""
    from xling.api.contracts import embedding_cache_dir
    from xling.trainer.model import model_fingerprint, resolve_model_path

    settings = spec.data.hard_negatives.mine
    path = resolve_model_path(settings.model or spec.model.name, tiny_texts)
    corpus = prepared.corpus
    key = mining_key(corpus, settings, model_fingerprint(path))
    meta = mined(corpus, key)
    if meta is None:
        started = time.perf_counter()
        with mining_encoder(path, spec, settings, model_root) as encoder:
            meta = mine(corpus, settings, encoder, key, embedding_cache_dir(spec.evaluation.cache_dir))
        print(f"mine: {meta['negatives']} negatives for {meta['with_negatives']} of {meta['passages']} passages "
              f"in {time.perf_counter() - started:.0f}s; removed {meta['removed']}", flush=True)  # fmt: skip
    if "://" in prepared.location.uri:
        publish_negatives(corpus.directory / NEGATIVES / key, f"{prepared.location.uri}/{NEGATIVES}/{key}")
    location = replace(prepared.location, negatives=key)
    return replace(prepared, corpus=PreparedCorpus(corpus.directory, key), location=location, mined=meta)
