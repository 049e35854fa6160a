"""A quiet console for ``xling run``: xling's own lines on the terminal, everything else in a log file.

Ray forwards each worker's output to the driver, prefixed ``(RayTrainWorker pid=…)``: standard output there
is xling's (phases, the progress bar), standard error is the libraries' (Ray Train's reports, faiss's AVX
probe, MLflow's warnings and artifact bars, tracebacks) and xling's details (:func:`detail`: the evaluation
tables). :class:`QuietConsole` sends worker standard output to the terminal without the prefix, and every
line, both streams, to the log file. Progress bars are thinned out on the way (:class:`_Lines`).
:func:`phase` marks a phase with its elapsed time; in a sweep, whose trials run side by side, a worker's
lines carry the trial's label (:func:`labelled`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

#: Ray's prefix of a forwarded line (with its colour codes); group 1 is the actor class.
RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((\w+)(?: pid=\d+)?(?:, ip=[\d.]+)?\)(?:\x1b\[0m)? ?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: A line of the training progress bar (``train_loop.progress_line``), a sweep trial's label before it.
PROGRESS = re.compile(r"^(?:\[[\w-]+\] )?\[[#.]+\] \d+/\d+ ")
#: Off a terminal, the console shows a progress bar at most this often; every bar is in the log.
BAR_EVERY_S = 30.0
#: What :class:`_Lines` times bars by (a test sets its own).
clock = time.monotonic


class _Lines:
    """A text stream that splits what is written into lines: each goes to the log, and to ``console`` when
    it is xling's (see the module's docstring).

    Progress bars: on a terminal each one redraws the last; elsewhere (a pipe, a file) the first is shown,
    then one at most every :data:`BAR_EVERY_S` seconds, and the latest before any other line, so that the
    bar before an evaluation and the last one are always there."""

    def __init__(self, log: IO[str], console: IO[str] | None, original: IO[str]) -> None:
        self.log, self.console, self.original, self.pending = log, console, original, ""
        self.live = console is not None and console.isatty()
        self.bar: str | None = None  # the latest bar not yet shown (off a terminal) or still open (on one)
        self.bar_shown = -float("inf")

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
        if m is not None and m.group(1) != "RayTrainWorker":  # not the driver's own, nor a training worker's
            return
        text = line[m.end() :] if m else line
        if PROGRESS.match(text):
            self._progress(text)
        else:
            self.end_bar()
            self.console.write(text + "\n")

    def _progress(self, text: str) -> None:
        console = self.console
        assert console is not None
        self.bar = text
        if self.live:  # in place: carriage return, erase the line
            console.write(f"\r\x1b[K{text}")
            console.flush()
        elif (now := clock()) - self.bar_shown >= BAR_EVERY_S:
            self.end_bar(now)

    def end_bar(self, now: float | None = None) -> None:
        """Show the bar held back (off a terminal), or end the line the bar redraws (on one)."""
        if self.bar is None or self.console is None:
            return
        self.console.write("\n" if self.live else self.bar + "\n")
        self.bar, self.bar_shown = None, clock() if now is None else now

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
            if isinstance(stream, _Lines):
                if stream.pending:
                    stream.write("\n")
                stream.end_bar()
        if err is not None:  # the traceback for whoever reads the log; the console gets one line
            import traceback

            self.file.write("".join(traceback.format_exception(kind, err, tb)))
        sys.stdout, sys.stderr = self.saved
        self.file.close()


def detail(text: str) -> None:
    """What is worth keeping but not worth the console (the evaluation tables): standard error, which
    :class:`QuietConsole` logs without showing, and Ray forwards from a worker to the driver's. Without a
    quiet console (a cluster's driver, a test) it is where standard error goes: the pod's log."""
    print(text, file=sys.stderr, flush=True)


def labelled(text: str, label: str | None) -> str:
    """``text`` under a sweep trial's label (``[p0-s1] train: ...``); as it is in a single run (no label)."""
    return f"[{label}] {text}" if label else text


@dataclass
class Phase:
    """A running phase; ``note`` (e.g. the evaluation's headline numbers) ends its ``done`` line."""

    note: str = ""


@contextmanager
def phase(name: str, what: str = "", show: bool = True, label: str | None = None) -> Iterator[Phase]:
    """``name: what`` when the phase starts, ``name: done in N s`` (and its note) when it ends: no silent
    minute. ``show=False`` (a worker other than rank 0) prints nothing; ``label`` names a sweep's trial."""
    if show:
        print(labelled(f"{name}: {what}" if what else f"{name}…", label), flush=True)
    started = time.monotonic()
    running = Phase()
    yield running
    if show:
        note = f" ({running.note})" if running.note else ""
        print(labelled(f"{name}: done in {time.monotonic() - started:.1f} s{note}", label), flush=True)
