"""Sweep statistics against reference computations (scipy.stats, closed forms) and a calibration study."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats as sps

from xling.trainer.stats import hierarchical_bootstrap, holm, mean_ci, welch_ci


@pytest.mark.parametrize("values", [[0.41, 0.44], [0.3, 0.35, 0.31], [1.0, 2.0, 4.0, 8.0, 16.0]])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_mean_ci_is_scipy_t_interval(values: list[float], confidence: float) -> None:
    got = mean_ci(values, confidence)
    x = np.array(values)
    low, high = sps.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert got.n == len(x)
    assert got.mean == pytest.approx(x.mean())
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert got.std == pytest.approx(x.std(ddof=1))


def test_mean_ci_textbook_value_and_degenerate_cases() -> None:
    # two seeds: t(0.975, 1) = 12.706, half width = 12.706 * sd / sqrt(2)
    ci = mean_ci([0.0, 1.0])
    assert ci.half_width == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), rel=1e-4)
    one = mean_ci([0.5, math.nan])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)


@pytest.mark.parametrize(
    ("a", "b"), [([0.41, 0.44, 0.43], [0.40, 0.41]), ([0.3, 0.5, 0.4, 0.45], [0.1, 0.2, 0.9])]
)
def test_welch_ci_is_scipys_welch_interval(a: list[float], b: list[float]) -> None:
    got = welch_ci(a, b, 0.9)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert got.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (got.low, got.high) == pytest.approx((ref.low, ref.high), rel=1e-10)
    one_seed = welch_ci([0.4], [0.3, 0.2])
    assert math.isnan(one_seed.low) and one_seed.diff == pytest.approx(0.15)


def _pair(n: int, effect: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One seed each (1 x n), per-query difficulty shared by both systems."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, n)
    return (base + effect + rng.normal(0, 0.1, n))[None], (base + rng.normal(0, 0.1, n))[None]


def _compare(
    a: np.ndarray, b: np.ndarray, questions: np.ndarray, strata: np.ndarray | None = None, **kw: int
):
    return hierarchical_bootstrap({"a": a, "b": b}, [("a", "b")], questions, strata, **kw)[("a", "b")]


def test_one_seed_one_query_per_question_is_the_plain_paired_bootstrap() -> None:
    a, b = _pair(400, 0.01, seed=1)
    ours = _compare(a, b, np.arange(400), resamples=20_000, seed=3)
    ref = sps.bootstrap((a[0], b[0]), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                        vectorized=True, n_resamples=20_000, rng=np.random.default_rng(4))  # fmt: skip
    assert ours.diff == pytest.approx(np.mean(a - b))
    assert ours.se == pytest.approx(ref.standard_error, rel=0.03)
    assert ours.df == pytest.approx(399) and (ours.n, ours.questions, ours.seeds) == (400, 400, (1, 1))
    assert math.isnan(ours.over_seeds.low), "one seed: no interval over seeds"


@pytest.mark.parametrize("effect", [0.0, 0.008, 0.02])
def test_p_value_matches_the_paired_t_test(effect: float) -> None:
    a, b = _pair(600, effect, seed=2)
    ours = _compare(a, b, np.arange(600), resamples=20_000, seed=5)
    assert ours.p_value == pytest.approx(sps.ttest_rel(a[0], b[0]).pvalue, abs=0.02)


def test_translations_of_a_question_are_resampled_together() -> None:
    # 120 questions x 5 languages (strata); the difference has a per-question part shared by the languages.
    rng = np.random.default_rng(11)
    questions, languages = np.tile(np.arange(120), 5), np.repeat(np.arange(5), 120)
    d = rng.normal(0, 0.1, 120)[questions] + rng.normal(0, 0.05, 600)
    test = _compare(d[None], np.zeros((1, 600)), questions.astype(str), languages, resamples=20_000)
    per_question = np.bincount(questions, weights=d) / 5
    assert test.diff == pytest.approx(d.mean())
    assert test.se == pytest.approx(per_question.std() / math.sqrt(120), rel=0.03)  # cluster SE, closed form
    naive = _compare(d[None], np.zeros((1, 600)), np.arange(600), languages, resamples=20_000)
    assert naive.se < 0.6 * test.se, "queries as independent: the interval is far too narrow"


def test_statistic_is_the_macro_average_over_strata() -> None:
    rng = np.random.default_rng(12)
    strata = np.repeat(["ar", "de", "zh"], (50, 200, 120))
    d = rng.normal(0, 0.1, 370) + (strata == "zh")
    test = _compare(d[None], np.zeros((1, 370)), np.arange(370), strata, resamples=500)
    assert test.diff == pytest.approx(np.mean([d[strata == s].mean() for s in ("ar", "de", "zh")]))


def test_seed_noise_reaches_the_bootstrap_with_the_welch_variance() -> None:
    # Both points score every query the same up to a per-run shift: only training noise separates them.
    rng = np.random.default_rng(13)
    base = rng.uniform(0, 1, 300)
    a = base + 0.01 + rng.normal(0, 0.02, (4, 1))
    b = base + rng.normal(0, 0.05, (3, 1))
    test = _compare(a, b, np.arange(300), resamples=40_000, seed=1)
    ma, mb = a.mean(axis=1), b.mean(axis=1)  # each seed's mean over queries
    welch, ref = welch_ci(ma, mb), sps.ttest_ind(ma, mb, equal_var=False)
    assert vars(test.over_seeds) == pytest.approx(vars(welch)) and test.seeds == (4, 3)
    assert test.se == pytest.approx(math.sqrt(ma.var(ddof=1) / 4 + mb.var(ddof=1) / 3), rel=0.03)
    assert test.df == pytest.approx(welch.df, rel=0.1)
    assert test.p_value == pytest.approx(ref.pvalue, abs=0.02)


def test_nan_queries_are_dropped_everywhere_and_results_are_seeded() -> None:
    a, b = _pair(200, 0.05, seed=3)
    c = np.vstack([b, b + 0.01])
    c[1, :10] = np.nan  # undefined for some queries in one seed of one configuration
    scores = {"a": a, "b": b, "c": c}
    out = hierarchical_bootstrap(scores, [("a", "b"), ("a", "c")], np.arange(200), resamples=2000, seed=1)
    assert out[("a", "b")].n == out[("a", "c")].n == 190
    assert out[("a", "b")].diff == pytest.approx(np.mean(a[0, 10:] - b[0, 10:]))
    again = hierarchical_bootstrap(scores, [("a", "b"), ("a", "c")], np.arange(200), resamples=2000, seed=1)
    assert again == out, "seeded: the summary and `xling results` print the same numbers"


def test_bad_shapes_name_the_input() -> None:
    a, b = _pair(20, 0.0, seed=4)
    with pytest.raises(ValueError, match="strata: expected 20 values"):
        _compare(a, b, np.arange(20), np.zeros(3))
    with pytest.raises(ValueError, match="questions: expected 20 values"):
        _compare(a, b, np.arange(19))
    with pytest.raises(ValueError, match=r"scores\['b'\]: expected a \(seeds x 20 queries\) array"):
        _compare(a, b[0], np.arange(20))
    with pytest.raises(ValueError, match="no query has a score"):
        _compare(a, np.full_like(b, np.nan), np.arange(20))


# ----------------------------------------------------------------------------- calibration


#: A small XQuAD-R: 40 questions x 11 languages.
QUESTIONS, LANGUAGES = 40, 11
ICC = 0.66
#: Spread of a point's own per-query effect (what makes two points differ query by query) and of each
#: run's per-query jitter.
ARM_SD, JITTER_SD = 0.1, 0.05
#: Variance of the difference of two points' means that comes from the questions (closed form).
QUESTION_VAR = 2 * ARM_SD**2 * (ICC + (1 - ICC) / LANGUAGES) / QUESTIONS


@dataclass(frozen=True)
class Design:
    """Seeds per point, and the share of the difference's variance that a per-run shift adds."""

    seeds: int
    seed_share: float

    @property
    def seed_sd(self) -> float:
        return math.sqrt(self.seed_share / (1 - self.seed_share) * QUESTION_VAR * self.seeds / 2)


THREE_SEEDS = Design(3, 0.5)


def _simulate(rng: np.random.Generator, effect: float, design: Design) -> dict[str, np.ndarray]:
    """Per-query AP of two points (seeds x queries, queries in language blocks) that differ by ``effect``."""
    q = np.tile(np.arange(QUESTIONS), LANGUAGES)
    base = rng.normal(0.5, 0.2, QUESTIONS)[q] + rng.normal(0, 0.135, q.size)  # difficulty, shared by both

    def point(mean: float) -> np.ndarray:
        own = ARM_SD * (
            math.sqrt(ICC) * rng.normal(0, 1, QUESTIONS)[q] + math.sqrt(1 - ICC) * rng.normal(0, 1, q.size)
        )
        run = rng.normal(0, design.seed_sd, (design.seeds, 1)) + rng.normal(
            0, JITTER_SD, (design.seeds, q.size)
        )
        return mean + base + own + run

    return {"a": point(effect), "b": point(0.0)}


QIDS = np.tile(np.arange(QUESTIONS), LANGUAGES).astype(str)
LANGS = np.repeat(np.arange(LANGUAGES), QUESTIONS)


def _rejections(effect: float, sims: int, design: Design = THREE_SEEDS, *, per_query: bool = False) -> float:
    """Share of simulations with p < 5 %. ``per_query``: the old test (seed means, translations independent)."""
    rng = np.random.default_rng(2024)
    hits = 0
    for k in range(sims):
        scores = _simulate(rng, effect, design)
        if per_query:
            scores = {name: x.mean(axis=0, keepdims=True) for name, x in scores.items()}
        test = hierarchical_bootstrap(scores, [("a", "b")], np.arange(QIDS.size) if per_query else QIDS, LANGS,
                                      resamples=200, seed=k)[("a", "b")]  # fmt: skip
        hits += test.p_value < 0.05
    return hits / sims


def _icc(x: np.ndarray) -> float:
    """One-way ICC(1) of a (questions x translations) matrix: the share of variance between questions."""
    k = x.shape[1]
    between, within = k * x.mean(axis=1).var(ddof=1), x.var(axis=1, ddof=1).mean()
    return float((between - within) / (between + (k - 1) * within))


# The second design is where percentiles of the resampled replicates fail (14.7 % of these nulls): two
# seeds, whose shift is 90 % of the variance.
@pytest.mark.parametrize("design", [THREE_SEEDS, Design(2, 0.9)], ids=str)
def test_false_positive_rate_under_a_null_with_question_and_seed_effects(design: Design) -> None:
    one_run = _simulate(np.random.default_rng(1), 0.0, design)["a"][0]
    assert 0.6 < _icc(one_run.reshape(LANGUAGES, QUESTIONS).T) < 0.72, "translations correlate as on XQuAD-R"
    rate = _rejections(0.0, 300, design)
    print(f"hierarchical bootstrap, null, {design}: {rate:.1%} of 300 p < 0.05")
    assert 0.02 <= rate <= 0.07


def test_the_query_level_bootstrap_rejects_a_true_null_far_too_often() -> None:
    # What the sweep report did before: seed means, every translation an independent query.
    rate = _rejections(0.0, 200, per_query=True)
    print(f"query-level bootstrap, null: {rate:.1%} of 200 p < 0.05")
    assert rate > 0.3


#: XQuAD-R's slice: about 5 questions on each paragraph. PARAGRAPH_SHARE of a point's own per-query
#: variance is shared by a paragraph's questions, which makes paragraph resampling's standard error 1.3x the
#: question-level one here (the issue measured 1.2-1.5x on the real slice).
PARAGRAPHS, PER_PARAGRAPH, PARAGRAPH_SHARE = 24, 5, 0.2


def _simulate_paragraphs(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Two points under the null whose per-query effects share a paragraph part; (scores, questions,
    paragraphs) with queries in language blocks."""
    questions = PARAGRAPHS * PER_PARAGRAPH
    q = np.tile(np.arange(questions), LANGUAGES)
    paragraph = q // PER_PARAGRAPH
    base = rng.normal(0.5, 0.2, PARAGRAPHS)[paragraph] + rng.normal(0, 0.1, questions)[q]
    base += rng.normal(0, 0.135, q.size)

    def point() -> np.ndarray:
        own = ARM_SD * (
            math.sqrt(PARAGRAPH_SHARE) * rng.normal(0, 1, PARAGRAPHS)[paragraph]
            + math.sqrt(ICC - PARAGRAPH_SHARE) * rng.normal(0, 1, questions)[q]
            + math.sqrt(1 - ICC) * rng.normal(0, 1, q.size)
        )
        return base + own + rng.normal(0, 0.01, (3, 1)) + rng.normal(0, JITTER_SD, (3, q.size))

    return {"a": point(), "b": point()}, q.astype(str), paragraph.astype(str)


@pytest.mark.parametrize(("unit", "low", "high"), [("paragraph", 0.02, 0.075), ("question", 0.09, 1.0)])
def test_false_positive_rate_under_paragraph_clustering(unit: str, low: float, high: float) -> None:
    """Questions on one paragraph share difficulty: resampling paragraphs (sweep.bootstrapUnit: paragraph)
    keeps the nominal 5 %; resampling questions, what the sweep did before, rejects a true null far more."""
    rng, hits, sims = np.random.default_rng(7), 0, 400
    for k in range(sims):
        scores, questions, paragraphs = _simulate_paragraphs(rng)
        units = paragraphs if unit == "paragraph" else questions
        langs = np.repeat(np.arange(LANGUAGES), PARAGRAPHS * PER_PARAGRAPH)
        hits += (
            hierarchical_bootstrap(scores, [("a", "b")], units, langs, resamples=200, seed=k)[
                ("a", "b")
            ].p_value
            < 0.05
        )
    print(f"{unit}-level bootstrap under paragraph clustering, null: {hits / sims:.1%} of {sims} p < 0.05")
    assert low <= hits / sims <= high


def test_power_under_a_real_effect() -> None:
    rate = _rejections(0.08, 200)
    print(f"hierarchical bootstrap, effect 0.08 mAP: power {rate:.1%} (200 simulations)")
    assert rate > 0.6


def test_holm_matches_a_hand_computation() -> None:
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
