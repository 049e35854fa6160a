"""``xling run``'s console: xling's lines on the terminal, Ray's and the libraries' in the run's log file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xling.trainer.console import QuietConsole, phase

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
