"""Helpers shared by the tests: the repository's paths, the Kubernetes emulator and schema checks."""

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

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


def xling_eval(monkeypatch: Any, load_text_encoder: Callable[..., Any], *argv: str) -> int:
    """``xling eval ARGV`` in this process with ``load_text_encoder`` in place of the model loader (an oracle
    or hashing encoder instead of a real model); returns the command's exit code."""
    import argparse
    from types import SimpleNamespace

    from xling.trainer.evaluation.cli import add_cli

    monkeypatch.setitem(
        sys.modules, "xling.trainer.model", SimpleNamespace(load_text_encoder=load_text_encoder)
    )
    parser = argparse.ArgumentParser(prog="xling")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", *argv])
    return args.func(args)
