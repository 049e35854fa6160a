"""docs/operator.md lists every condition type and reason the operator writes, and no others.

Users match on these strings (``kubectl wait``, alerts), so a reason added without a line in the docs fails here.
"""

from __future__ import annotations

import re
from enum import StrEnum

import pytest

from tests.support import ROOT
from xling.operator.conditions import ConditionReason, ConditionType

DOC = ROOT / "docs" / "operator.md"


def documented(heading: str) -> list[str]:
    """The backquoted first cell of each table row in the section under ``heading``."""
    section = DOC.read_text().split(f"\n{heading}\n", 1)[1]
    section = re.split(r"\n#{1,3} ", section, maxsplit=1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("heading", "enum"), [("### Condition types", ConditionType), ("### Condition reasons", ConditionReason)]
)
def test_docs_list_every_member_once(heading: str, enum: type[StrEnum]) -> None:
    names = documented(heading)
    assert len(names) == len(set(names)), f"listed twice under {heading!r}"
    assert set(names) == {m.value for m in enum}, f"{heading!r} and {enum.__name__} differ"
