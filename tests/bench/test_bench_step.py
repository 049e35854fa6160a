"""bench/bench_step.py's CPU mode end to end: every case trains the tiny model on the same batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import load_bench

bs = load_bench("bench_step")


def test_cpu_mode_runs_every_case_on_the_same_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    assert (
        bs.main(
            [
                "--mode",
                "cpu",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--threads",
                "1",
                "--json",
                str(out),
                "--output-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    results = {r["case"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(bs.CASES) - {"ref-bf16"}  # no bf16 reference in an fp32 run
    for r in results.values():
        assert r["pairs_per_s"] > 0 and 0 < r["mfu"] < 1 and r["plan_step_s"] > 0, r
    # the same weights, batches and dropout stream: every case computes the same first loss
    first = {case: r["loss_first"] for case, r in results.items()}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    assert results["xling-auto"]["detail"] == "ZeRO-0"  # stage auto: no sharding for a tiny model
    printed = capsys.readouterr().out
    for num, den in (("xling-torch", "ref-amp"), ("xling-zero3", "ds-zero3"), ("xling-auto", "ds-zero2")):
        assert f"{num} / {den}: " in printed
