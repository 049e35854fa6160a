"""The research comparison is valid by construction: every strategy draws the same pool, and no batch
holds a false negative (docs/research-protocol.md)."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

from tests.support import ROOT
from xling.api.spec.base import XQUAD_R_LANGUAGES
from xling.api.spec.loading import load_experiment
from xling.api.spec.training import DataSource, DataSpec, SamplingSpec
from xling.trainer.data import load_corpus
from xling.trainer.data.pairs import PairCorpus
from xling.trainer.data.pairs import normalise as _normalise
from xling.trainer.sampling import build_sampler
from xling.trainer.train_loop import batch_texts

DEMO = ROOT / "data" / "demo"
RESEARCH_SAMPLES = ["research.yaml", "research-gpu.yaml", "research-gpu-1.yaml", "demo.yaml"]
normalise = functools.cache(_normalise)  # each text is met many times in 1,000 batches
STRATEGIES = [SamplingSpec(strategy="xx"), SamplingSpec(strategy="xy"), SamplingSpec(strategy="hybrid", alpha=0.5),
              SamplingSpec(strategy="mixed")]  # fmt: skip


@pytest.mark.parametrize("sample", RESEARCH_SAMPLES)
def test_every_strategy_draws_the_same_groups_and_languages(sample: str) -> None:
    exp = load_experiment(ROOT / "manifests" / "samples" / sample)
    corpus = load_corpus(exp.spec.data)
    batch = exp.spec.optimization.global_batch_size
    drawn = [build_sampler(corpus.index, batch, s).drawable() for s in STRATEGIES]
    groups, queries, passages = drawn[0]
    assert len(groups) == len(corpus) > 1000
    for other in drawn[1:]:
        assert other == drawn[0]
    assert queries == passages == set(exp.spec.data.languages)
    # sides: both, so X-X and X-Y draw the very same texts (no question whose paragraph only X-Y could use)
    assert all(p.query is not None and p.passage is not None for g in corpus.groups for p in g.values())


def bundled_corpus() -> PairCorpus:
    """Every bundled training source; the monolingual QA sets in their explicit pool."""
    mono = {"pool": "monolingual"}
    sources = [
        DataSource(type="mlqa", path=str(DEMO / "mlqa-test-gxlt")),
        DataSource(type="ntrex", path=str(DEMO / "ntrex-128")),
        DataSource(type="tydiqa", path=str(DEMO / "tydiqa-goldp"), **mono),
        DataSource(type="squad", path=str(DEMO / "native-qa" / "arcd"), language="ar", **mono),
        DataSource(type="squad", path=str(DEMO / "native-qa" / "cmrc2018" / "cmrc2018_dev.json.gz"), language="zh",
                   **mono),
        DataSource(type="iapp", path=str(DEMO / "native-qa" / "iapp-wiki-qa"), **mono),
    ]  # fmt: skip
    return load_corpus(DataSpec(languages=list(XQUAD_R_LANGUAGES), sources=sources))


def false_negative_rate(corpus: PairCorpus, sampling: SamplingSpec, batch: int, batches: int) -> float:
    """Share of queries for which another item's positive or hard negative is their own positive or a
    translation of it (any passage of their group), or contains their query sentence or a translation of it
    verbatim (an NTREX window holding a neighbour's sentence; sentences of 20 characters or more)."""
    sampler = build_sampler(corpus.index, batch, sampling)
    bad = total = 0
    for step in range(batches):
        plan = sampler.plan(step)
        _, positives, negatives, valid = batch_texts(corpus, plan, 0, 1, hard_negatives=1)
        positives = [normalise(p) for p in positives]
        others = [{positives[j]} | ({normalise(negatives[j])} if valid[j] else set()) for j in range(batch)]
        joined = "\x00".join(positives)
        for i, item in enumerate(plan.items):
            group = corpus.groups[item.group]
            own = {normalise(p.passage) for p in group.values() if p.passage is not None}
            sentences = [
                q for p in group.values() if p.query is not None and len(q := normalise(p.query)) >= 20
            ]
            rest = [j for j in range(batch) if j != i]
            total += 1
            quoted = [q for q in sentences if q in joined]  # cheap filter before the item-by-item check
            bad += any(own & others[j] for j in rest) or any(q in positives[j] for q in quoted for j in rest)
    return bad / total


@pytest.fixture(scope="module")
def bundled() -> PairCorpus:
    return bundled_corpus()


@pytest.mark.parametrize("sampling", STRATEGIES, ids=lambda s: s.strategy)
def test_no_in_batch_false_negatives_in_1000_batches(bundled: PairCorpus, sampling: SamplingSpec) -> None:
    assert false_negative_rate(bundled, sampling, batch=32, batches=1000) == 0.0


def test_without_conflict_keys_the_same_check_finds_false_negatives(bundled: PairCorpus) -> None:
    """The measurement can fail: with only one key per group (no text or window keys) it finds them."""
    bare = PairCorpus(bundled.groups)
    bare.index = replace(
        bundled.index, key_offsets=np.zeros(len(bare) + 1, np.int64), key_values=np.empty(0, np.int64)
    )
    assert false_negative_rate(bare, SamplingSpec(strategy="xy"), batch=32, batches=300) > 0.01
