"""A quiet console for ``xling run``: xling's own lines on the terminal, everything else in a log file.

Ray forwards each worker's output to the driver, prefixed ``(RayTrainWorker pid=…)``: standard output there
is xling's (evaluation tables, the progress bar), standard error is the libraries' (Ray Train's reports,
faiss's AVX probe, MLflow's warnings and artifact bars, tracebacks). :class:`QuietConsole` sends worker
standard output to the terminal without the prefix, and every line, both streams, to the log file.
:func:`phase` marks the driver's phases with their elapsed time.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

#: Ray's prefix of a forwarded line (with its colour codes); group 1 is the actor class.
RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((\w+)(?: pid=\d+)?(?:, ip=[\d.]+)?\)(?:\x1b\[0m)? ?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Lines:
    """A text stream that splits what is written into lines: each goes to the log, and to ``console`` when
    it is xling's (see the module's docstring)."""

    def __init__(self, log: IO[str], console: IO[str] | None, original: IO[str]) -> None:
        self.log, self.console, self.original, self.pending = log, console, original, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        self.log.write(ANSI.sub("", line.split("\r")[-1]) + "\n")
        if self.console is None:
            return
        m = RAY_PREFIX.match(line)
        if m is None or m.group(1) == "RayTrainWorker":  # the driver's own, or a training worker's
            self.console.write(line[m.end() :] + "\n" if m else line + "\n")

    def flush(self) -> None:
        self.log.flush()
        if self.console is not None:
            self.console.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The stream's own descriptor, for those that write below Python (faulthandler)."""
        return self.original.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


class QuietConsole:
    """Inside the block, stdout shows xling's lines and stderr goes to ``log_path`` only (both streams are
    logged). Enter it before Ray or MLflow is imported: their log handlers keep the stream they start with."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def __enter__(self) -> QuietConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.log_path.open("a", encoding="utf-8", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout = _Lines(self.file, sys.stdout, sys.stdout)  # type: ignore[assignment]
        sys.stderr = _Lines(self.file, None, sys.stderr)  # type: ignore[assignment]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Lines) and stream.pending:
                stream.write("\n")
        if err is not None:  # the traceback for whoever reads the log; the console gets one line
            import traceback

            self.file.write("".join(traceback.format_exception(kind, err, tb)))
        sys.stdout, sys.stderr = self.saved
        self.file.close()


@contextmanager
def phase(name: str, what: str = "") -> Iterator[None]:
    """``name: what`` when the phase starts, ``name: done in N s`` when it ends: no silent minute."""
    print(f"{name}: {what}" if what else f"{name}…", flush=True)
    started = time.monotonic()
    yield
    print(f"{name}: done in {time.monotonic() - started:.1f} s", flush=True)
