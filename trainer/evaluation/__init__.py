"""Multilingual retrieval evaluation: XQuAD-R / MLQA-R (mono, cross, multi, language bias) and MIRACL.

Importing the package is cheap (the CLI registers ``xling eval`` through it); numpy, FAISS and
matplotlib load on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_suite": "api",
    "evaluate_suite": "api",
    "evaluate_with_centering": "api",
    "Suite": "api",
    "log_to_mlflow": "report",
    "format_table": "report",
    "headline_number": "report",
    "write_results_json": "report",
    "add_cli": "cli",
    "TextEncoder": "protocol",
    "HashingEncoder": "hashing",
    "EvalDataError": "errors",
    "LareqaResults": "results",
    "MiraclResults": "results",
    "SuiteResults": "results",
    "write_run": "trec",
    "write_qrels": "trec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
