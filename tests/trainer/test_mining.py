"""Hard-negative mining: no mined negative is the positive, a translation, a conflict-key member or above the
score ratio; mining is deterministic and reused; batches leave out negatives of their own groups; and a
run's workers (a resumed one too) read the same negatives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import ROOT
from xling.api.spec.training import DataSource, DataSpec, MineSpec
from xling.trainer.data import open_corpus, prepare_corpus
from xling.trainer.mining import RULES, mine, mined
from xling.trainer.sampling import BatchPlan, Item
from xling.trainer.train_loop import batch_texts

#: The anchor's English query and the cosine each English passage gets for it (the positive: 0.9).
SCORES = {"pos a": 0.9, "key b": 0.88, "near d": 0.89, "e": 0.8, "f": 0.7}


class Scripted:
    """An encoder whose cosines are set by hand: the anchor query against each passage as in SCORES,
    everything else near-orthogonal."""

    fingerprint = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for i, text in enumerate(texts):
            if kind == "query":
                out[i] = (1, 0, 0) if text == "query a" else (0, 0, 1)
            elif text in SCORES:
                out[i] = (SCORES[text], np.sqrt(1 - SCORES[text] ** 2), 0)
            else:
                out[i] = (0.05, 0.0, np.sqrt(1 - 0.05**2))
        return out


def write_corpus(tmp: Path) -> DataSpec:
    """Groups in en and de. b shares a key with a; c's English passage is a's; d scores above 0.95 x the
    positive; e and f are the true hard negatives; g..k are unrelated."""
    english = {"a": ("query a", "pos a"), "b": ("query b", "key b"), "c": ("query c", "pos a"),
               "d": ("query d", "near d"), "e": ("query e", "e"), "f": ("query f", "f")}  # fmt: skip
    english |= {g: (f"query {g}", f"passage {g}") for g in "ghijk"}
    rows = []
    for g, (query, passage) in english.items():
        keys = ["doc:1"] if g in "ab" else []
        rows.append({"pair_id": g, "language": "en", "query": query, "passage": passage, "keys": keys})
        rows.append({"pair_id": g, "language": "de", "query": f"frage {g}", "passage": f"absatz {g}"})
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSpec(
        languages=["de", "en"], sources=[DataSource(type="pairs", path=str(path))], drop_eval_overlap=False
    )


@pytest.fixture
def corpus(tmp_path: Path):
    return prepare_corpus(write_corpus(tmp_path), str(tmp_path / "data")).corpus


def negatives_of(corpus, key: str, group: str, lang: str = "en") -> list[str]:
    by_id = {p.pair_id: g for g, p in enumerate(next(iter(g.values())) for g in corpus.materialize().groups)}
    mined_corpus = type(corpus)(corpus.directory, key)
    return [text for text, _ in mined_corpus.negatives([(by_id[group], lang)])[0]]


def test_no_mined_negative_is_a_false_negative(corpus) -> None:
    meta = mine(corpus, MineSpec(per_pair=2, top_k=11), Scripted(), "k1")
    # a's English passage: not itself, not c (the same text), not b (a shared key), not d (0.89 > 0.95 x 0.9)
    assert negatives_of(corpus, "k1", "a") == ["e", "f"]
    assert set(meta["removed"]) == set(RULES)
    assert meta["removed"]["positive"] >= 1 and meta["removed"]["score_ratio"] >= 1
    assert meta["removed"]["conflict_key"] >= 2  # b and c for a, a for b, a for c
    members = np.load(corpus.directory / "negatives/k1/members.npy")
    index = corpus.index
    groups = index.member_key // len(index.languages)
    for member, row in enumerate(members):
        for negative in row[row >= 0]:
            assert negative != member and groups[negative] != groups[member]
            assert not set(index.keys(int(groups[negative]))) & set(index.keys(int(groups[member])))
            assert index.member_key[negative] % 2 == index.member_key[member] % 2  # the passage's language


def test_skip_top_and_the_ratio(corpus) -> None:
    mine(corpus, MineSpec(per_pair=1, top_k=11, skip_top=2), Scripted(), "skip")
    assert negatives_of(corpus, "skip", "a") == [
        "f"
    ]  # d and e, the first two the identity rules leave, skipped
    mine(corpus, MineSpec(per_pair=1, top_k=11, max_score_ratio=1.0), Scripted(), "loose")
    assert negatives_of(corpus, "loose", "a") == ["near d"]


def test_mining_is_deterministic_and_reused(corpus) -> None:
    encoder = Scripted()
    mine(corpus, MineSpec(per_pair=3), encoder, "one")
    mine(corpus, MineSpec(per_pair=3), encoder, "two")
    for name in ("members.npy", "scores.npy"):
        a, b = (np.load(corpus.directory / f"negatives/{k}/{name}") for k in ("one", "two"))
        assert np.array_equal(a, b, equal_nan=True)
    assert mined(corpus, "one")["negatives"] > 0 and mined(corpus, "three") is None


def test_a_batch_leaves_out_negatives_of_its_own_groups(corpus) -> None:
    mine(corpus, MineSpec(per_pair=2, top_k=11), Scripted(), "k1")
    mined_corpus = type(corpus)(corpus.directory, "k1")
    by_id = {p.pair_id: g for g, p in enumerate(next(iter(g.values())) for g in corpus.materialize().groups)}
    plan = BatchPlan(0, "xx", (Item(by_id["a"], "en", "en"), Item(by_id["e"], "en", "en")), language="en")
    _, passages, negatives, valid = batch_texts(mined_corpus, plan, 0, 1, hard_negatives=2)
    assert passages == ["pos a", "e"]
    assert negatives[:2] == ["f", ""] and valid[:2] == [True, False]  # e is in the batch: skipped


def tiny_experiment(tmp: Path, workers: int = 1) -> dict:
    """A tiny-model run over 60 NTREX pairs in de and en, mining 2 negatives per passage."""
    return {"apiVersion": "xling.io/v1alpha1", "kind": "RetrievalExperiment", "metadata": {"name": "mine"},
            "spec": {"model": {"name": "xling/tiny-random", "maxQueryLength": 16, "maxPassageLength": 24},
                     "data": {"languages": ["de", "en"], "dropEvalOverlap": False,
                              "sources": [{"type": "ntrex", "path": str(ROOT / "data/demo/ntrex-128"),
                                           "maxPairsPerLanguage": 60}],
                              "hardNegatives": {"mine": {"perPair": 2, "topK": 8, "maxScoreRatio": 1.0,
                                                         "batchSize": 16, "workers": workers}}},
                     "sampling": {"strategy": "hybrid", "seed": 0}, "loss": {"hardNegatives": 2},
                     "optimization": {"globalBatchSize": 8, "maxSteps": 4},
                     "evaluation": {"cacheDir": str(tmp / "embeddings")},
                     "outputDir": str(tmp / "runs")}}  # fmt: skip


def test_tiny_model_mining_end_to_end_and_a_resumed_worker_reads_the_same_batches(tmp_path: Path) -> None:
    """``xling mine``'s path with a real (tiny, random: so no score ratio) model, reused on a second run; a fresh process opening the
    run's location (a resumed worker) reads the very same texts and negatives for a step."""
    from xling.api.spec.loading import parse_experiment
    from xling.trainer.driver import prepare_data
    from xling.trainer.sampling import build_sampler

    doc = tiny_experiment(tmp_path)
    exp = parse_experiment(doc)
    first = prepare_data(exp)
    meta = first.mined
    assert meta["negatives"] > 0 and meta["removed"]["positive"] > 0
    again = prepare_data(parse_experiment(doc))
    assert again.location == first.location and again.mined == meta
    sampler = build_sampler(first.corpus.index, 8, exp.spec.sampling)
    resumed = open_corpus(first.location, tmp_path / "cache")
    for step in range(4):
        plan = sampler.plan(step)
        assert batch_texts(first.corpus, plan, 0, 2, 2) == batch_texts(resumed, plan, 0, 2, 2)
    assert any(batch_texts(resumed, sampler.plan(s), 0, 1, 2)[3].count(True) for s in range(4))


@pytest.mark.slow
def test_mining_on_ray_workers_finds_the_same_negatives(tmp_path: Path) -> None:
    """Two Ray actors share the encoding (each its own batches, as on a cluster's GPUs): the negatives and
    their scores are those of mining in one process. More actors than the cluster can hold is an error, not
    a wait that never ends."""
    import ray

    from xling.api.spec.loading import parse_experiment
    from xling.api.spec.training import ModelSpec
    from xling.trainer.driver import prepare_data
    from xling.trainer.sharded_encoder import ShardedEncoder

    try:
        alone, spread = (
            prepare_data(parse_experiment(tiny_experiment(tmp_path / str(n), workers=n))) for n in (1, 2)
        )
        assert ray.is_initialized()  # the sharded run started Ray; the first one did not need it
        too_many = int(ray.cluster_resources()["CPU"]) + 1
        with pytest.raises(ValueError, match="data.hardNegatives.mine.workers"):
            prepare_data(parse_experiment(tiny_experiment(tmp_path / "many", workers=too_many)))
        # a run that trains on GPUs mines on GPUs, whatever the machine shows: here it has none
        with pytest.raises(ValueError, match="1 actors, but this Ray has 0 GPUs"):
            ShardedEncoder("unused", ModelSpec(name="xling/tiny-random"), 16, 1, gpus=True)
    finally:
        ray.shutdown()
    assert spread.location.negatives == alone.location.negatives  # the key does not depend on the workers
    for name in ("members.npy", "scores.npy"):
        a, b = (
            np.load(p.corpus.directory / "negatives" / p.location.negatives / name) for p in (alone, spread)
        )
        assert np.array_equal(a, b) if name == "members.npy" else np.allclose(a, b, atol=1e-6, equal_nan=True)
    assert spread.mined["removed"] == alone.mined["removed"] and spread.mined["negatives"] > 0
