"""``xling run``'s console: xling's lines on the terminal, Ray's and the libraries' in the run's log file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xling.trainer.console import QuietConsole, phase
from xling.trainer.sweep.progress import SweepProgress, eta_text

WORKER = "\x1b[36m(RayTrainWorker pid=21016)\x1b[0m "


def test_worker_output_reaches_the_console_without_ray_prefix_and_noise_goes_to_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "logs" / "smoke.log"
    with QuietConsole(log):
        print("data: 1199 pairs in 300 groups")
        print(f"{WORKER}[####................] 2/8 loss=2.7487 pairs/s=383.1 eta=1s")
        print("\x1b[36m(TrainController pid=30946)\x1b[0m Started training worker group of size 1")
        print("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task")
        print(f"{WORKER}Loading faiss with AVX2 support.", file=sys.stderr)
        sys.stderr.write("Downloading artifacts:  10%|█ | 1/10\rDownloading artifacts: 100%|██| 10/10\n")
    out = capsys.readouterr()
    assert (
        out.out
        == "data: 1199 pairs in 300 groups\n[####................] 2/8 loss=2.7487 pairs/s=383.1 eta=1s\n"
    )
    assert out.err == ""
    logged = log.read_text()
    assert "(RayTrainWorker pid=21016) Loading faiss with AVX2 support." in logged and "\x1b[" not in logged
    assert "Downloading artifacts: 100%|██| 10/10\n" in logged and "10%" not in logged, "a bar's last state"
    assert "(TrainController pid=30946) Started training worker group of size 1" in logged
    assert "(raylet) A worker died or was killed" in logged


def test_an_error_leaves_its_traceback_in_the_log_and_the_console_as_it_was(tmp_path: Path) -> None:
    log = tmp_path / "smoke.log"
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError), QuietConsole(log):
        raise RuntimeError("a worker died")
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert "Traceback" in log.read_text() and "RuntimeError: a worker died" in log.read_text()


def test_a_phase_says_when_it_starts_and_how_long_it_took(capsys: pytest.CaptureFixture[str]) -> None:
    with phase("prepare", "the data"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0] == "prepare: the data"
        and lines[1].startswith("prepare: done in ")
        and lines[1].endswith(" s")
    )


def test_a_phase_can_end_with_a_note_and_be_silent_on_other_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    with phase("zero-shot", "xquad-r") as running:
        running.note = "xquad-r multi.map 0.2124"
    with phase("zero-shot", "xquad-r", show=False) as running:
        running.note = "rank 1"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == "zero-shot: xquad-r"
    assert lines[1].startswith("zero-shot: done in ") and lines[1].endswith(" s (xquad-r multi.map 0.2124)")


def test_a_sweep_trial_labels_its_phases_and_bars_a_single_run_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trials run side by side: each worker line says whose it is; a labelled bar is still a bar (thinned)."""
    with QuietConsole(tmp_path / "sweep.log"):
        with phase("zero-shot", "xquad-r", label="p0-s1"):
            pass
        for step in (1, 2):
            print(f"{WORKER}[p0-s1] " + bar(step).removeprefix(WORKER))
        with phase("export", "the model"):
            pass
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[p0-s1] zero-shot: xquad-r" and lines[1].startswith("[p0-s1] zero-shot: done in ")
    # the first bar, then the latest before the next other line: both bars, each held to one line
    assert lines[2].startswith("[p0-s1] [##..") and lines[2].split()[2] == "1/8"
    assert lines[3].startswith("[p0-s1] [#####..") and lines[3].split()[2] == "2/8"
    assert lines[4] == "export: the model" and lines[5].startswith("export: done in ") and len(lines) == 6


def test_each_finished_trial_is_one_line_with_the_count_and_an_eta() -> None:
    now = [100.0]
    progress = SweepProgress(4, "xquad_r/multi/map", clock=lambda: now[0])
    now[0] = 160.0
    first = progress.line("p0-s0", 1, {"xquad_r/multi/map": 0.31234, "step": 8})
    assert first == "sweep: trial p0-s0 finished: xquad_r/multi/map 0.3123 (1/4 finished, ETA 3m 00s)"
    now[0] = 220.0
    assert (
        progress.line("p1-s0", 2, None, failed=True) == "sweep: trial p1-s0 failed (2/4 finished, ETA 2m 00s)"
    )
    assert progress.line("p0-s1", 4, {}).endswith("(4/4 finished, done)")
    assert eta_text(3 * 3600 + 5 * 60) == "ETA 3h 05m" and eta_text(42) == "ETA 42s"


def bar(step: int) -> str:
    return f"{WORKER}[{'#' * (step * 20 // 8):.<20}] {step}/8 loss=2.7 pairs/s=300.0 eta=1s"


def test_off_a_terminal_the_console_shows_the_first_bar_the_one_before_each_other_line_and_the_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every bar is logged; the console gets the first, one at most every BAR_EVERY_S seconds, the latest
    before any other line (the bar an evaluation starts from) and, at the end, the last one."""
    log = tmp_path / "smoke.log"
    with QuietConsole(log):
        print("train: Ray and 1 worker(s)")
        for step in range(1, 5):
            print(bar(step))
        print(f"{WORKER}evaluate step 4: xquad-r")
        print(f"{WORKER}Encoding tables…", file=sys.stderr)  # the log only: holds nothing back
        for step in range(5, 9):
            print(bar(step))
    shown = [line.split("] ")[-1].split()[0] for line in capsys.readouterr().out.splitlines()]
    assert shown == ["train:", "1/8", "4/8", "evaluate", "8/8"]
    assert all(f"] {step}/8 loss" in log.read_text() for step in range(1, 9))


def test_a_bar_shows_when_the_console_has_been_quiet_long_enough(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import xling.trainer.console as console

    times = iter([0.0, 10.0, 31.0, 32.0, 70.0])  # when bars 1-5 arrive
    monkeypatch.setattr(console, "clock", lambda: next(times))
    with QuietConsole(tmp_path / "smoke.log"):
        for step in range(1, 6):
            print(bar(step))
    shown = [line.split("] ")[-1].split()[0] for line in capsys.readouterr().out.splitlines()]
    assert shown == ["1/8", "3/8", "5/8"]


class Terminal:
    """A console that is a terminal."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1


def test_on_a_terminal_each_bar_redraws_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with QuietConsole(tmp_path / "smoke.log"):
        print(bar(1))
        print(bar(2))
        print(f"{WORKER}evaluate step 2: xquad-r")
    assert terminal.text == (
        f"\r\x1b[K{bar(1).removeprefix(WORKER)}\r\x1b[K{bar(2).removeprefix(WORKER)}\nevaluate step 2: xquad-r\n"
    )
