"""Helpers shared by the tests: the repository's paths, the Kubernetes emulator and schema checks."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
#: Recorded upstream files the tests check against (with their SOURCE.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_script(folder: str, name: str) -> ModuleType:
    """Import ``<folder>/<name>.py`` (``bench/`` and ``tools/`` hold scripts, not packages) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as module ``name``."""
    return load_script("bench", name)
