"""Sweep statistics against reference computations (scipy.stats and closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from xling.trainer.stats import holm, mean_ci, paired_bootstrap, paired_bootstrap_many


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


def _pair(n: int, effect: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, n)  # per-query difficulty, shared by both systems
    return base + effect + rng.normal(0, 0.1, n), base + rng.normal(0, 0.1, n)


def test_bootstrap_interval_matches_scipy_bootstrap() -> None:
    a, b = _pair(400, 0.01, seed=1)
    ours = paired_bootstrap(a, b, resamples=20_000, seed=3)
    ref = sps.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=20_000,
        rng=np.random.default_rng(4),
    )
    se = ref.standard_error
    assert ours.diff == pytest.approx(np.mean(a - b))
    assert abs(ours.low - ref.confidence_interval.low) < 0.1 * se
    assert abs(ours.high - ref.confidence_interval.high) < 0.1 * se
    assert ours.n == 400 and ours.resamples == 20_000


@pytest.mark.parametrize("effect", [0.0, 0.008, 0.02])
def test_bootstrap_p_value_matches_paired_t_test(effect: float) -> None:
    # With many queries the bootstrap distribution of the mean difference is close to normal, so its
    # p-value must agree with the paired t-test's.
    a, b = _pair(600, effect, seed=2)
    ours = paired_bootstrap(a, b, resamples=20_000, seed=5)
    ref = sps.ttest_rel(a, b)
    assert ours.p_value == pytest.approx(ref.pvalue, abs=0.02)


def test_bootstrap_p_value_is_calibrated_under_the_null() -> None:
    rejections = 0
    for k in range(300):
        a, b = _pair(60, 0.0, seed=100 + k)
        rejections += paired_bootstrap(a, b, resamples=400, seed=k).p_value < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_clear_difference_reaches_the_smallest_p() -> None:
    a, b = _pair(300, 0.2, seed=7)
    test = paired_bootstrap(a, b, resamples=999)
    assert test.p_value == pytest.approx(1 / 1000)
    assert test.low > 0.15 and test.high < 0.25


def test_stratified_statistic_is_the_macro_average_with_the_analytic_standard_error() -> None:
    rng = np.random.default_rng(11)
    sizes, spreads = (50, 200, 120), (0.05, 0.2, 0.1)
    strata = np.repeat(np.arange(3), sizes)
    d = np.concatenate(
        [rng.normal(0.01 * (s + 1), sd, n) for s, (n, sd) in enumerate(zip(sizes, spreads, strict=True))]
    )
    test = paired_bootstrap_many({"a": d, "b": np.zeros_like(d)}, [("a", "b")], strata, resamples=40_000)[
        ("a", "b")
    ]
    groups = [d[strata == s] for s in range(3)]
    assert test.diff == pytest.approx(np.mean([g.mean() for g in groups]))  # macro, not micro
    # Var of the macro mean under resampling within strata: sum_s var0_s / n_s / S^2 (closed form).
    se = math.sqrt(sum(g.var() / g.size for g in groups)) / 3
    z = sps.norm.ppf(0.975)
    assert (test.high - test.low) / (2 * z) == pytest.approx(se, rel=0.04)


def test_many_pairs_share_queries_and_drop_nan_everywhere() -> None:
    a, b = _pair(200, 0.05, seed=3)
    c = b.copy()
    c[:10] = np.nan  # undefined for some queries in one configuration: dropped for every comparison
    out = paired_bootstrap_many({"a": a, "b": b, "c": c}, [("a", "b"), ("a", "c")], resamples=2000, seed=1)
    assert out[("a", "b")].n == out[("a", "c")].n == 190
    assert out[("a", "b")].diff == pytest.approx(np.mean(a[10:] - b[10:]))
    again = paired_bootstrap_many({"a": a, "b": b, "c": c}, [("a", "b"), ("a", "c")], resamples=2000, seed=1)
    assert again == out, "seeded: the summary and `xling results` print the same numbers"
    with pytest.raises(ValueError, match="strata"):
        paired_bootstrap(a, b, strata=np.zeros(3))


def test_holm_matches_a_hand_computation() -> None:
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
