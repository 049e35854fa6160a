"""The "matches or beats" verdict: a margin from the spec, and a match that singles the claimed arm out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from xling.api.spec.sweep import SweepSpec
from xling.trainer.sweep.claims import CLAIMS, Outcome, verdict

MATCH = next(c for c in CLAIMS if c.matches)  # hybrid matches X-X on mono and X-Y on cross


def _outcome(check, diff: float, half: float, p_holm: float = 1.0) -> Outcome:
    return Outcome(check, SimpleNamespace(p_holm=p_holm), diff, diff - half, diff + half)  # type: ignore[arg-type]


def _verdict(hybrid: tuple[float, float], rival_gap: float, margin: float = 0.005) -> str:
    """Both checks of the claim with the same hybrid interval (diff, half width) and rival gap."""
    outcomes = [_outcome(c, *hybrid) for c in MATCH.checks]
    rivals = [_outcome(c.rival, rival_gap, 0.003) for c in MATCH.checks]
    return verdict(MATCH, outcomes, 0.05, margin, rivals)


def test_a_match_needs_the_interval_inside_the_margin() -> None:
    assert _verdict((0.001, 0.003), rival_gap=-0.02) == "reproduced (matches within 0.005)"
    # the published table's hybrid - xx mono [-0.0003, +0.0062] held at 0.01; an interval reaching -0.008 does not
    assert _verdict((-0.002, 0.006), rival_gap=-0.02) == "not separable at this scale"
    assert _verdict((-0.002, 0.006), rival_gap=-0.02, margin=0.01) == "reproduced (matches within 0.01)"


def test_a_match_the_alternative_arm_shares_is_no_match_for_hybrid() -> None:
    """With the old rule X-Y also "matched" X-X on mono: a gap inside hybrid's interval (or above it)
    means the claim cannot tell hybrid from the alternative."""
    for gap in (-0.001, 0.0, 0.01):
        result = _verdict((0.001, 0.003), rival_gap=gap)
        assert result.startswith("not separable at this scale: xy - xx mono"), result
        assert "xx - xy cross" in result


def test_significant_results_decide_before_the_margin() -> None:
    outcomes = [_outcome(c, -0.002, 0.001, p_holm=0.001) for c in MATCH.checks]
    assert verdict(MATCH, outcomes, 0.05, 0.005) == "not reproduced"


def test_the_margin_is_a_spec_field_with_a_default_and_a_reason() -> None:
    field = SweepSpec.model_fields["equivalence_margin"]
    assert SweepSpec().equivalence_margin == 0.005 and "0.0075" in (field.description or "")
    assert SweepSpec.model_validate({"equivalenceMargin": 0.01}).equivalence_margin == 0.01
    with pytest.raises(ValidationError, match="equivalenceMargin"):
        SweepSpec.model_validate({"equivalenceMargin": 0})
