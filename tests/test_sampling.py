"""Sampler invariants, property-based: per-batch language rules, no parallel duplicates, rank
consistency and resumability (a pure function of seed and step)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xling.trainer.data.pairs import Pair, PairCorpus
from xling.trainer.sampling import Composition, build_sampler
from xling.trainer.spec import SamplingSpec

LANGS = ["ar", "de", "en", "es", "zh"]


def corpus(n_parallel: int = 60, n_mono: int = 40, langs: list[str] = LANGS) -> PairCorpus:
    groups = [{lang: Pair(f"par{i}", lang, f"q{i}{lang}", f"p{i}{lang}") for lang in langs} for i in range(n_parallel)]
    groups += [{"en": Pair(f"mono{i}", "en", f"mq{i}", f"mp{i}")} for i in range(n_mono)]
    return PairCorpus(groups)


@st.composite
def settings_(draw):
    strategy = draw(st.sampled_from(["xx", "xy", "hybrid", "mixed"]))
    spec = SamplingSpec(
        strategy=strategy,
        alpha=draw(st.floats(0, 1)),
        seed=draw(st.integers(0, 2**31)),
        language_weighting=draw(st.sampled_from(["uniform", "size"])),
    )
    world = draw(st.sampled_from([1, 2, 4]))
    batch = world * draw(st.integers(1, 8))
    return spec, batch, world


C = corpus()


@settings(max_examples=150, deadline=None)
@given(settings_(), st.integers(0, 10_000))
def test_batch_invariants(cfg, step) -> None:
    spec, batch, world = cfg
    plan = build_sampler(C, batch, spec).plan(step)
    assert len(plan.items) == batch
    groups = [it.group for it in plan.items]
    assert len(set(groups)) == batch, "two members of one parallel group in a batch"
    for it in plan.items:
        assert it.qlang in C.groups[it.group] and it.plang in C.groups[it.group]
    if plan.kind == "xx":
        assert {it.qlang for it in plan.items} == {it.plang for it in plan.items} == {plan.language}
    elif plan.kind == "xy":
        assert all(it.qlang != it.plang for it in plan.items)
    else:
        assert all(it.qlang == it.plang for it in plan.items)
    expected_kind = {"xx": {"xx"}, "xy": {"xy"}, "hybrid": {"xx", "xy"}, "mixed": {"mixed"}}[spec.strategy]
    assert plan.kind in expected_kind


@settings(max_examples=60, deadline=None)
@given(settings_(), st.integers(0, 10_000))
def test_ranks_agree_and_slices_are_disjoint(cfg, step) -> None:
    spec, batch, world = cfg
    # Each rank builds its own sampler (as in separate processes) and must see the same global batch.
    plans = [build_sampler(C, batch, spec).plan(step) for _ in range(world)]
    assert all(p == plans[0] for p in plans)
    shards = [plans[r].shard(r, world) for r in range(world)]
    flat = [it for s in shards for it in s]
    assert flat == list(plans[0].items)
    assert all(len(s) == batch // world for s in shards)


@settings(max_examples=40, deadline=None)
@given(settings_(), st.integers(1, 50))
def test_resuming_gives_identical_batches(cfg, k) -> None:
    spec, batch, _ = cfg
    first = build_sampler(C, batch, spec)
    run = [first.plan(s) for s in range(k + 5)]
    resumed = build_sampler(C, batch, spec)  # a fresh process after a restart at step k
    assert [resumed.plan(s) for s in range(k, k + 5)] == run[k:]


def test_hybrid_realises_alpha() -> None:
    spec = SamplingSpec(strategy="hybrid", alpha=0.3, seed=1)
    sampler = build_sampler(C, 8, spec)
    comp = Composition()
    for s in range(2000):
        comp.add(sampler.plan(s))
    assert abs(comp.metrics()["batches.xx_fraction"] - 0.3) < 0.04
    assert comp.kinds["xx"] + comp.kinds["xy"] == 2000


def test_xx_uniform_vs_size_weighting() -> None:
    skewed = corpus(n_parallel=20, n_mono=400)
    counts = {}
    for weighting in ("uniform", "size"):
        sampler = build_sampler(skewed, 8, SamplingSpec(strategy="xx", language_weighting=weighting))
        comp = Composition()
        for s in range(1000):
            comp.add(sampler.plan(s))
        counts[weighting] = comp.languages["en"] / sum(comp.languages.values())
    assert 0.12 < counts["uniform"] < 0.28  # 1 of 5 languages
    assert counts["size"] > 0.8  # en has 420 of 500 groups


def test_xy_needs_enough_parallel_groups() -> None:
    with pytest.raises(ValueError, match="parallel groups"):
        build_sampler(corpus(n_parallel=4), 8, SamplingSpec(strategy="xy"))


def test_seed_changes_batches() -> None:
    a = build_sampler(C, 8, SamplingSpec(strategy="xy", seed=1)).plan(0)
    b = build_sampler(C, 8, SamplingSpec(strategy="xy", seed=2)).plan(0)
    assert a != b
