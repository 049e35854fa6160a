"""The one way a user's mistake reaches the user: an error that says where, and one place that prints it.

A spec, data, a model file or a results file that cannot be used raises :class:`InputError` (or a subclass
naming the input: ``SpecError``, ``EvalDataError``, ``BadRowError``, ``PlanError``, ``DemoModelError``), which carries
the file (or resource), the line where known and the field path of each problem; ``str()`` is the text every
CLI prints. :func:`command` wraps each CLI handler (``xling run``, ``eval``, ``render``, ...) so that they all
print and exit alike, and catches only these: any other exception is a bug and keeps its traceback. Standard
library only: the operator imports it.
"""

from __future__ import annotations

import functools
import re
import sys
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Exit code of a run refused for its input (argparse uses the same for bad flags).
EXIT_INPUT = 2
#: Exit code of a run that started and failed (a worker's error, out of memory).
EXIT_FAILED = 1
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Problem:
    """One thing wrong: at ``field`` (a dotted path as the user writes it, e.g. ``spec.sampling.alpha`` or
    ``data[0].paragraphs[3]``), or in the input as a whole when ``field`` is None."""

    message: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InputError(ValueError):
    """Input the user must fix, naming where: ``source`` (file or resource), ``line`` where known, and each
    problem's field path. With ``problems``, ``message`` heads the list (one problem per line).

    A ``ValueError`` still, so that code which validates input with ``except ValueError`` (pydantic, parsers)
    keeps treating it as invalid input; the printer, though, catches only this type."""

    def __init__(
        self,
        source: str | Path | None,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        problems: Sequence[Problem] = (),
    ):
        self.source = None if source is None else str(source)
        self.line = line
        self.headline = message if problems else None
        self.problems = tuple(problems) or (Problem(message, field),)
        super().__init__(self._text())

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its fields, not by calling ``__init__`` with ``args`` (the text alone): Ray pickles a
        worker's error to send it to the driver, and a subclass's ``__init__`` differs (``BadRowError``)."""
        return _rebuilt, (type(self), str(self), self.__dict__)

    def _text(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.headline is None:
            return ": ".join(part for part in (where, str(self.problems[0])) if part)
        head = ": ".join(part for part in (where, self.headline) if part)
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def _rebuilt(cls: type[InputError], text: str, fields: dict[str, Any]) -> InputError:
    """An unpickled InputError (see ``InputError.__reduce__``)."""
    err = cls.__new__(cls, text)
    err.__dict__.update(fields)
    return err


@contextmanager
def sweep_point(label: str | None) -> Iterator[None]:
    """An input error of one sweep point's spec, prefixed with the point's label (None: not a sweep point,
    the error as it is), so the user knows which combination of values to change."""
    if label is None:
        yield
        return
    try:
        yield
    except InputError as err:
        raise InputError(None, f"sweep point {label}: {err}") from None


class RunFailed(RuntimeError):
    """A run that started and failed, as one line (:func:`failure_reason`); the tracebacks are in the log."""


#: What a worker's error says -> the spec field to change, and the advice. First match wins.
_BLAME = (
    (("outofmemoryerror", "out of memory"), "spec.optimization.globalBatchSize",
     "out of memory: lower it, or set loss.gradCache or a DeepSpeed offload (xling plan estimates the memory)"),
    (("config.json", "huggingface", "from_pretrained", "tokenizer"), "spec.model.name", "the model did not load"),
    (("badrowerror", "jsonl", "parquet", ".csv", ".tsv"), "spec.data.sources", "a data row or file could not be read"),
)  # fmt: skip


def training_failed(err: BaseException) -> bool:
    """Ray Train's error for a run that failed (``TrainingFailedError``, named: no Ray import here)."""
    return any(cls.__name__ == "TrainingFailedError" for cls in type(err).__mro__)


def failure_reason(err: BaseException) -> str:
    """One line for the console and the failed MLflow run: the first failed rank's own error, unwrapped from
    Ray Train's (``worker_failures``, ``controller_failure``), prefixed with the spec field to change where
    the error points at one."""
    where = ""
    if failures := getattr(err, "worker_failures", None):
        rank, err = min(failures.items())
        where = f" (rank {rank})"
    err = getattr(err, "controller_failure", err)
    if isinstance(err, InputError):
        return " ".join(str(err).split())
    text = f"{type(err).__name__}{where}: {' '.join(str(err).split())}"[:500]
    if any(kind in type(err).__name__ for kind in ("HealthCheckFailed", "ActorDied", "WorkerCrashed")):
        log = re.search(r"log_file_path='([^']+)'", str(err))
        return (f"the worker process{where} died ({type(err).__name__}): killed (out of memory?) or crashed"
                + (f"; its log: {log[1]}" if log else ""))  # fmt: skip
    lowered = f"{type(err).__name__} {err}".lower()
    for needles, field, advice in _BLAME:
        if any(n in lowered for n in needles):
            return f"{field}: {advice}: {text}"
    return text


def report(err: InputError | FileNotFoundError | KeyboardInterrupt) -> int:
    """Print ``err`` for the user on stderr and return the exit code: an InputError as it reads (it names the
    file or field), a missing path after ``error:``."""
    if isinstance(err, KeyboardInterrupt):
        print("interrupted: completed steps and trials are kept; rerun to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(err if isinstance(err, InputError) else f"error: {err}", file=sys.stderr)
    return EXIT_INPUT


def command(handler: Callable[[Namespace], int]) -> Callable[[Namespace], int]:
    """A CLI handler whose user-facing errors are reported (:func:`report`) instead of raised: InputError, a
    path the user named that does not exist (``FileNotFoundError``), Ctrl-C, and a run that failed. Anything
    else (a ``ValueError`` or ``KeyError`` of a bug) propagates with its traceback, and Python exits 1."""

    @functools.wraps(handler)
    def run(args: Namespace) -> int:
        try:
            return handler(args)
        except (InputError, FileNotFoundError, KeyboardInterrupt) as err:
            return report(err)
        except RunFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED

    return run
