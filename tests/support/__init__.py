"""Helpers shared by the tests: the repository's paths, the Kubernetes emulator and schema checks."""

from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
#: Recorded upstream files the tests check against (with their SOURCE.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
