"""Shared fixtures: paths, the staged data beside the repo, and a tiny corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT

SHARED = Path(os.environ.get("XLING_SHARED", ROOT.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"staged data not found at {path} (set XLING_SHARED)")
    return path
