"""The hybrid-batch paper's claims, checked against a sweep that has the xx, xy and hybrid (alpha = 0.5)
points (and mixed, for LAReQA's claim): each one reproduced, not reproduced, or not separable at this
scale, with the numbers it rests on and, where not separable, what scale would separate it.

A check is one directional comparison from the sweep's hierarchical bootstrap (seeds, then paragraphs),
significant when its Holm-corrected p-value is below 1 - confidence. "Matches" needs a margin to mean
anything (sweep.equivalenceMargin), and it must single the claimed arm out: hybrid's interval lies above
-margin AND excludes the gap the alternative arm shows against the same reference (else X-Y would "match"
X-X on mono as well as hybrid does, and the claim says nothing about hybrid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xling.trainer.stats import _t_quantile
from xling.trainer.sweep.markup import Table

if TYPE_CHECKING:
    from xling.trainer.sweep.summary import Comparison, PointSummary, SweepSummary

#: Power the "scale needed" column plans for (two-sided test at the sweep's confidence).
POWER_Z = 0.8416  # the standard normal's 80 % quantile


@dataclass(frozen=True)
class Check:
    """``a`` is better than ``b`` in ``setting``; ``sign`` +1 when higher is better, -1 when lower is."""

    a: str
    b: str
    setting: str
    sign: int = 1
    alternative: str | None = None  # the arm whose gap to b a "match" of a must exclude

    @property
    def rival(self) -> Check | None:
        """The alternative's own check against the same reference, if the claim names one."""
        return None if self.alternative is None else Check(self.alternative, self.b, self.setting, self.sign)


@dataclass(frozen=True)
class Claim:
    text: str
    checks: tuple[Check, ...]
    matches: bool = False  # "matches or beats": a tie within sweep.equivalenceMargin counts as reproduced


CLAIMS = (
    Claim("X-X-mono beats X-Y on monolingual mAP", (Check("xx", "xy", "mono"),)),
    Claim("X-Y beats X-X-mono on cross-lingual mAP", (Check("xy", "xx", "cross"),)),
    Claim(
        "Hybrid is best on multilingual mAP", (Check("hybrid", "xx", "multi"), Check("hybrid", "xy", "multi"))
    ),
    Claim(
        "Hybrid has the lowest language bias (rank distance)",
        (Check("hybrid", "xx", "rank_distance", -1), Check("hybrid", "xy", "rank_distance", -1)),
    ),
    Claim(
        "Hybrid matches or beats X-X-mono on mono and X-Y on cross",
        (Check("hybrid", "xx", "mono", alternative="xy"), Check("hybrid", "xy", "cross", alternative="xx")),
        matches=True,
    ),
    Claim(
        "LAReQA: mixed (languages mixed within a batch) is below X-X-mono on multilingual mAP",
        (Check("xx", "mixed", "multi"),),
    ),
)


def roles(points: list[PointSummary]) -> dict[str, int]:
    """Point index of each arm the claims name: xx, xy, mixed by strategy; hybrid at alpha = 0.5."""
    out = {}
    for p in points:
        role = p.strategy if p.strategy != "hybrid" else "hybrid" if p.xx_share == 0.5 else None
        if role in ("xx", "xy", "hybrid", "mixed") and p.trials:
            out.setdefault(role, p.index)
    return out


@dataclass(frozen=True)
class Outcome:
    """A check's signed result: ``diff`` > 0 means the claim's direction."""

    check: Check
    comparison: Comparison
    diff: float
    low: float
    high: float

    @property
    def raw(self) -> tuple[float, float, float]:
        """a - b and its interval, unsigned (as the comparison table shows them)."""
        d, lo, hi = self.diff * self.check.sign, self.low * self.check.sign, self.high * self.check.sign
        return d, min(lo, hi), max(lo, hi)


def _outcome(check: Check, comparisons: list[Comparison], where: dict[str, int]) -> Outcome | None:
    a, b = where.get(check.a), where.get(check.b)
    for c in comparisons:
        if c.setting == check.setting and {c.a, c.b} == {a, b}:
            flip = check.sign * (1 if (c.a, c.b) == (a, b) else -1)
            ends = sorted((flip * c.test.low, flip * c.test.high))
            return Outcome(check, c, flip * c.test.diff, *ends)
    return None


def verdict(
    claim: Claim,
    outcomes: list[Outcome],
    alpha: float,
    margin: float,
    rivals: list[Outcome | None] | None = None,
) -> str:
    """``rivals``: per outcome, its check's alternative against the same reference (None: none named)."""
    significant = [o.comparison.p_holm < alpha for o in outcomes]
    if any(s and o.diff < 0 for s, o in zip(significant, outcomes, strict=True)):
        return "not reproduced"
    if all(s and o.diff > 0 for s, o in zip(significant, outcomes, strict=True)):
        return "reproduced"
    if claim.matches and all(o.low > -margin for o in outcomes):
        rivals = rivals or [None] * len(outcomes)
        shared = [r for o, r in zip(outcomes, rivals, strict=True) if r is not None and r.diff >= o.low]
        if not shared:
            return f"reproduced (matches within {margin:g})"
        return "not separable at this scale: " + "; ".join(
            f"{r.check.a} - {r.check.b} {r.check.setting} {r.diff:+.4f} reaches hybrid's interval too"
            for r in shared
        )
    return "not separable at this scale"


def seeds_needed(o: Outcome, confidence: float) -> str:
    """Seeds per arm (at this question count) for 80 % power against the observed difference, from the
    interval's parts: the seed variance (the Welch interval over seeds) and the rest (the questions)."""
    test = o.comparison.test
    seeds = min(test.seeds)
    target = abs(test.diff) / (_t_quantile(confidence, math.inf) + POWER_Z)
    over = test.over_seeds
    if not (math.isfinite(over.low) and math.isfinite(test.se)) or test.diff == 0:
        return "-"
    seed_var = ((over.high - over.low) / 2 / _t_quantile(confidence, over.df)) ** 2
    question_var = max(test.se**2 - seed_var, 0.0)
    if target**2 <= question_var:
        return f"more questions too: question noise alone (se {math.sqrt(question_var):.4f}) exceeds {target:.4f}"
    return f"about {math.ceil(seeds * seed_var / (target**2 - question_var))} seeds per arm"


#: What a trained arm must beat the centering baseline on: the pooled task and language bias.
AGAINST_CENTERING = (("multi", 1), ("rank_distance", -1))
NAMES = {"xx": "X-X-mono", "xy": "X-Y", "hybrid": "Hybrid", "mixed": "Mixed"}


def _centering_rows(s: SweepSummary, where: dict[str, int], alpha: float) -> list[list[str]]:
    """One row per arm: does training beat subtracting each language's mean from the untrained model?"""
    rows = []
    for role, index in where.items():
        tests = {c.setting: c for c in s.against_centering if c.a == index}
        if not all(setting in tests for setting, _ in AGAINST_CENTERING):
            continue
        signed = [(tests[setting], sign * tests[setting].test.diff) for setting, sign in AGAINST_CENTERING]
        if any(c.p_holm < alpha and d < 0 for c, d in signed):
            result = "not reproduced: centering is better"
        elif all(c.p_holm < alpha and d > 0 for c, d in signed):
            result = "reproduced"
        else:
            result = "not separable at this scale"
        evidence = "; ".join(
            f"{role} - centering {c.setting} {c.test.diff:+.4f} [{c.test.low:+.4f}, {c.test.high:+.4f}], "
            f"p(Holm) {c.p_holm:.3f}"
            for c, _ in signed
        )
        text = f"{NAMES[role]} beats language-mean centering (multi mAP and rank distance)"
        rows.append([text, result, evidence, "-"])
    return rows


def claims_table(s: SweepSummary) -> Table | None:
    where = roles(s.points)
    if not {"xx", "xy", "hybrid"} <= where.keys() or not s.comparisons:
        return None
    alpha = 1 - s.sweep.confidence
    rows = []
    for claim in CLAIMS:
        outcomes = [o for c in claim.checks if (o := _outcome(c, s.comparisons, where)) is not None]
        if len(outcomes) < len(claim.checks):
            continue
        rivals = [_outcome(c.rival, s.comparisons, where) if c.rival else None for c in claim.checks]
        result = verdict(claim, outcomes, alpha, s.sweep.equivalence_margin, rivals)
        evidence = "; ".join(
            f"{o.check.a} - {o.check.b} {o.check.setting} {o.raw[0]:+.4f} [{o.raw[1]:+.4f}, {o.raw[2]:+.4f}], "
            f"p(Holm) {o.comparison.p_holm:.3f}"
            for o in outcomes
        )
        scale = "-"
        if "separable" in result:
            scale = "; ".join(
                "separated" if o.comparison.p_holm < alpha else seeds_needed(o, s.sweep.confidence)
                for o in outcomes
            )
        rows.append([claim.text, result, evidence, scale])
    rows += _centering_rows(s, where, alpha)
    pct = round(100 * s.sweep.confidence)
    return Table(
        f"The paper's claims at this scale (hierarchical bootstrap, {pct}% intervals, Holm-corrected p)",
        ["claim", "verdict", "evidence: A - B, interval, p", "scale needed (80% power)"],
        rows,
    )
