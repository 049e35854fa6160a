"""Sampler invariants, property-based: per-batch language rules, no parallel duplicates and no shared
conflict key, rank consistency and resumability (a pure function of seed and step); and the sampling
distributions (X-Y uniform over language pairs, X-X only over languages that can fill a batch)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xling.api.spec.training import SamplingSpec
from xling.trainer.data.pairs import Pair, PairCorpus
from xling.trainer.sampling import Composition, build_sampler

LANGS = ["ar", "de", "en", "es", "zh"]


def corpus(n_parallel: int = 60, n_mono: int = 40, langs: list[str] = LANGS, n_asym: int = 0) -> PairCorpus:
    groups = [
        {lang: Pair(f"par{i}", lang, f"q{i}{lang}", f"p{i}{lang}") for lang in langs}
        for i in range(n_parallel)
    ]
    groups += [{"en": Pair(f"mono{i}", "en", f"mq{i}", f"mp{i}", pool="monolingual")} for i in range(n_mono)]
    # MLQA-like: questions in ar and hi, paragraphs in de only, a question and a paragraph in es;
    # every third group shares its es paragraph with the next one (one paragraph, two questions)
    for i in range(n_asym):
        shared = f"para{i - i % 2}"
        groups.append({"ar": Pair(f"asym{i}", "ar", f"aq{i}", None), "hi": Pair(f"asym{i}", "hi", f"hq{i}", None),
                       "de": Pair(f"asym{i}", "de", None, f"dp{i}"),
                       "es": Pair(f"asym{i}", "es", f"eq{i}", shared if i % 3 == 0 else f"ep{i}")})  # fmt: skip
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


C = corpus(n_asym=30)


@settings(max_examples=150, deadline=None)
@given(settings_(), st.integers(0, 10_000))
def test_batch_invariants(cfg, step) -> None:
    spec, batch, world = cfg
    plan = build_sampler(C.index, batch, spec).plan(step)
    assert len(plan.items) == batch
    groups = [it.group for it in plan.items]
    assert len(set(groups)) == batch, "two members of one parallel group in a batch"
    keys = [k for g in groups for k in C.index.keys(g)]
    assert len(keys) == len(set(keys)), "two groups with a shared conflict key in a batch"
    for it in plan.items:
        assert C.groups[it.group][it.qlang].query is not None
        assert C.groups[it.group][it.plang].passage is not None
        if plan.kind == "xy":
            assert all(p.pool == "shared" for p in C.groups[it.group].values())
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
    plans = [build_sampler(C.index, batch, spec).plan(step) for _ in range(world)]
    assert all(p == plans[0] for p in plans)
    shards = [plans[r].shard(r, world) for r in range(world)]
    flat = [it for s in shards for it in s]
    assert flat == list(plans[0].items)
    assert all(len(s) == batch // world for s in shards)


@settings(max_examples=40, deadline=None)
@given(settings_(), st.integers(1, 50))
def test_resuming_gives_identical_batches(cfg, k) -> None:
    spec, batch, _ = cfg
    first = build_sampler(C.index, batch, spec)
    run = [first.plan(s) for s in range(k + 5)]
    resumed = build_sampler(C.index, batch, spec)  # a fresh process after a restart at step k
    assert [resumed.plan(s) for s in range(k, k + 5)] == run[k:]


def test_hybrid_realises_alpha() -> None:
    spec = SamplingSpec(strategy="hybrid", alpha=0.3, seed=1)
    sampler = build_sampler(C.index, 8, spec)
    comp = Composition()
    for s in range(2000):
        comp.add(sampler.plan(s))
    assert abs(comp.metrics()["batches/xx_fraction"] - 0.3) < 0.04
    assert comp.kinds["xx"] + comp.kinds["xy"] == 2000


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1), st.integers(1, 60), st.integers(0, 2**31))
def test_exact_schedule_gives_round_alpha_n_xx_batches(alpha: float, steps: int, seed: int) -> None:
    """The coin gave 0.35-0.5 X-X at alpha 0.5 over 40 steps; the exact schedule gives the nominal count,
    and the logged fraction is that count over the run."""
    spec = SamplingSpec(strategy="hybrid", alpha=alpha, seed=seed, alpha_schedule="exact")
    sampler = build_sampler(C.index, 4, spec, steps)
    comp = Composition()
    for s in range(steps):
        comp.add(sampler.plan(s))
    assert comp.kinds["xx"] == math.floor(alpha * steps + 0.5)
    assert comp.metrics().get("batches/xx_fraction", 0.0) == comp.kinds["xx"] / steps
    assert comp.kinds["xx"] + comp.kinds["xy"] == steps


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 0.95), st.integers(2, 40), st.integers(0, 2**31), st.integers(0, 120))
def test_exact_schedule_is_a_pure_function_of_seed_and_step(
    alpha: float, steps: int, seed: int, k: int
) -> None:
    """Ranks (separate samplers) and a resume at step k (a fresh sampler) see the same batches, in any order
    of asking, also past the run's length (the schedule repeats per block of maxSteps)."""
    spec = SamplingSpec(strategy="hybrid", alpha=alpha, seed=seed, alpha_schedule="exact")
    run = [build_sampler(C.index, 4, spec, steps).plan(s) for s in range(k + 3)]
    fresh = build_sampler(C.index, 4, spec, steps)
    assert [fresh.plan(s) for s in reversed(range(k, k + 3))] == run[k:][::-1]


def test_exact_schedule_orders_differ_by_seed_and_need_the_run_length() -> None:
    kinds = {
        seed: [p.kind for p in map(build_sampler(C.index, 4, spec, 40).plan, range(40))]
        for seed in (0, 1)
        for spec in [SamplingSpec(strategy="hybrid", alpha=0.5, seed=seed, alpha_schedule="exact")]
    }
    assert kinds[0] != kinds[1] and kinds[0].count("xx") == kinds[1].count("xx") == 20
    with pytest.raises(ValueError, match="alphaSchedule.*maxSteps"):
        build_sampler(C.index, 4, SamplingSpec(strategy="hybrid", alpha_schedule="exact"))


def test_asymmetric_groups_use_only_the_sides_they_have() -> None:
    asym = corpus(n_parallel=0, n_mono=0, n_asym=40)
    assert asym.sizes() == {"es": 40}  # the only language with a question and a paragraph
    assert set(asym.index.by_pair()) == {("ar", "de"), ("ar", "es"), ("es", "de"), ("hi", "de"), ("hi", "es")}
    xy = build_sampler(asym.index, 8, SamplingSpec(strategy="xy"))
    pairs = Composition()
    for s in range(200):
        pairs.add(xy.plan(s))
    assert set(pairs.pairs) == {"ar-de", "ar-es", "es-de", "hi-de", "hi-es"}
    xx = build_sampler(asym.index, 8, SamplingSpec(strategy="xx"))
    assert {xx.plan(s).language for s in range(20)} == {"es"}


def test_groups_sharing_a_key_never_meet() -> None:
    """Pairs of groups share one passage text: a batch of 20 out of 40 groups must take one of each pair."""
    groups = [{"en": Pair(f"g{i}", "en", f"q{i}", f"p{i // 2}"), "de": Pair(f"g{i}", "de", f"fq{i}", f"fp{i}")}
              for i in range(40)]  # fmt: skip
    c = PairCorpus(groups)
    for strategy in ("xx", "xy", "mixed"):
        sampler = build_sampler(c.index, 20, SamplingSpec(strategy=strategy, seed=3))
        for s in range(50):
            assert sorted(it.group // 2 for it in sampler.plan(s).items) == list(range(20))
    with pytest.raises(ValueError, match="share no conflict key"):
        build_sampler(c.index, 21, SamplingSpec(strategy="xx"))


def test_xy_is_uniform_over_language_pairs() -> None:
    """500 five-language groups and 500 en-de groups: 20 ordered pairs, so en-de is 1/20 of the X-Y items
    (drawing a group first and then two of its languages gave en-de 28 %)."""
    five = ["ar", "de", "en", "es", "zh"]
    groups = [{lang: Pair(f"f{i}", lang, f"q{i}{lang}", f"p{i}{lang}") for lang in five} for i in range(500)]
    groups += [
        {lang: Pair(f"b{i}", lang, f"bq{i}{lang}", f"bp{i}{lang}") for lang in ("en", "de")}
        for i in range(500)
    ]
    c = PairCorpus(groups)
    shares = {}
    for weighting in ("uniform", "size"):
        comp = Composition()
        sampler = build_sampler(c.index, 16, SamplingSpec(strategy="xy", pair_weighting=weighting))
        for s in range(1000):
            comp.add(sampler.plan(s))
        shares[weighting] = comp.pairs["en-de"] / sum(comp.pairs.values())
        assert len(comp.pairs) == 20
    assert 0.04 < shares["uniform"] < 0.06
    assert 0.09 < shares["size"] < 0.11  # 1000 of the 10,000 (pair, group) entries


def test_size_weighting_draws_only_languages_that_fill_a_batch() -> None:
    c = PairCorpus([{"en": Pair(f"e{i}", "en", f"q{i}", f"p{i}")} for i in range(100)]
                   + [{"de": Pair(f"d{i}", "de", f"q{i}", f"dp{i}")} for i in range(5)])  # fmt: skip
    sampler = build_sampler(
        c.index, 8, SamplingSpec(strategy="xx", language_weighting="size", language_temperature=3.0)
    )
    assert {sampler.plan(s).language for s in range(300)} == {"en"}  # de (5 groups) cannot fill 8
    with pytest.raises(ValueError, match="needs a language with 200 groups"):
        build_sampler(c.index, 200, SamplingSpec(strategy="hybrid", alpha=0.5))


def test_composition_logs_query_and_passage_shares() -> None:
    sampler = build_sampler(C.index, 8, SamplingSpec(strategy="xy", seed=4))
    comp = Composition()
    for s in range(50):
        comp.add(sampler.plan(s))
    m = comp.metrics()
    queries = {k: v for k, v in m.items() if k.startswith("batches/query_share/")}
    passages = {k: v for k, v in m.items() if k.startswith("batches/passage_share/")}
    assert set(queries) == {f"batches/query_share/{lang}" for lang in LANGS + ["hi"]}
    assert "batches/query_share/de" in queries and "batches/passage_share/hi" not in passages
    assert sum(queries.values()) == pytest.approx(1) and sum(passages.values()) == pytest.approx(1)
    assert Composition.from_dict(comp.as_dict()) == comp


def test_xx_uniform_vs_size_weighting() -> None:
    skewed = corpus(n_parallel=20, n_mono=400)
    counts = {}
    for weighting in ("uniform", "size"):
        sampler = build_sampler(skewed.index, 8, SamplingSpec(strategy="xx", language_weighting=weighting))
        comp = Composition()
        for s in range(1000):
            comp.add(sampler.plan(s))
        counts[weighting] = comp.languages["en"] / sum(comp.languages.values())
    assert 0.12 < counts["uniform"] < 0.28  # 1 of 5 languages
    assert counts["size"] > 0.8  # en has 420 of 500 groups


def test_xy_needs_enough_parallel_groups() -> None:
    with pytest.raises(ValueError, match="parallel groups"):
        build_sampler(corpus(n_parallel=4).index, 8, SamplingSpec(strategy="xy"))


def test_seed_changes_batches() -> None:
    a = build_sampler(C.index, 8, SamplingSpec(strategy="xy", seed=1)).plan(0)
    b = build_sampler(C.index, 8, SamplingSpec(strategy="xy", seed=2)).plan(0)
    assert a != b


@pytest.mark.parametrize("schedule", ["bernoulli", "exact"])
@pytest.mark.parametrize(("alpha", "pure"), [(1.0, "xx"), (0.0, "xy")])
def test_hybrid_at_alpha_0_and_1_gives_the_pure_strategies_batches(
    alpha: float, pure: str, schedule: str
) -> None:
    """The research sweep reuses the X-X and X-Y trials as the ends of the alpha curve: that holds only if
    the batches are the very same, not just equally distributed."""
    spec = SamplingSpec(strategy="hybrid", alpha=alpha, seed=3, alpha_schedule=schedule)
    hybrid = build_sampler(C.index, 8, spec, 40)
    alone = build_sampler(C.index, 8, SamplingSpec(strategy=pure, seed=3))
    assert [hybrid.plan(s) for s in range(40)] == [alone.plan(s) for s in range(40)]
