"""The sweep's console: one line per trial that ends, with how many of the plan have and an ETA.

Ray Tune's own status table is off (``verbose=0``): it repeats every trial each time and hides the few
lines that matter. :class:`SweepProgress` formats those lines (no Ray, so tests call it directly);
:func:`tune_callback` wraps it in the Tune callback the driver passes to ``RunConfig``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

#: Tune's statuses of a trial that will not run again.
ENDED = ("TERMINATED", "ERROR")


def eta_text(seconds: float) -> str:
    """``ETA 3m 20s``, ``ETA 1h 05m``; ``ETA ?`` before there is a rate to go by."""
    if not math.isfinite(seconds):
        return "ETA ?"
    s = round(seconds)
    if s >= 3600:
        return f"ETA {s // 3600}h {s % 3600 // 60:02d}m"
    return f"ETA {s // 60}m {s % 60:02d}s" if s >= 60 else f"ETA {s}s"


class SweepProgress:
    """Counts the trials that ended against the plan's ``planned``; the ETA goes by the mean time per trial
    ended in this process (a continued sweep's earlier trials count as ended, not in the rate)."""

    def __init__(self, planned: int, metric: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.planned, self.metric, self.clock = planned, metric, clock
        self.started, self.seen = clock(), 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled with a continued sweep's RunConfig: the rate starts again from now."""
        self.__dict__.update(state)
        self.started, self.seen = self.clock(), 0

    def line(self, label: str, ended: int, result: dict[str, Any] | None, failed: bool = False) -> str:
        """The line for trial ``label`` ending, ``ended`` trials (it included) having ended in all."""
        self.seen += 1
        rate = (self.clock() - self.started) / self.seen
        remaining = max(self.planned - ended, 0)
        value = (result or {}).get(self.metric)
        what = "failed" if failed else "finished"
        if not failed and isinstance(value, int | float):
            what += f": {self.metric} {value:.4f}"
        eta = "done" if not remaining else eta_text(rate * remaining)
        return f"sweep: trial {label} {what} ({ended}/{self.planned} finished, {eta})"


def tune_callback(progress: SweepProgress, label: Callable[[Any], str]) -> Any:
    """A Ray Tune callback printing ``progress``'s line for each trial that completes or fails; ``label``
    names a Tune trial as the plan does (``p0-s1``)."""
    from ray.tune import Callback

    class _Lines(Callback):  # type: ignore[misc]
        def _print(self, trials: list[Any], trial: Any, failed: bool) -> None:
            ended = len({t.trial_id for t in trials if t.status in ENDED} | {trial.trial_id})
            print(progress.line(label(trial), ended, trial.last_result, failed), flush=True)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._print(trials, trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._print(trials, trial, failed=True)

    return _Lines()
