"""Sweep machinery overhead per trial on CPU: from trial start to the first training step.

Runs a small sweep of the tiny model (no evaluation, so nothing but setup precedes step 1) through the
real driver (``run_sweep``: Ray Tune trial -> TorchTrainer -> worker) and reads the timings back from
MLflow, where they are recorded anyway:

- trial start: the child run's start time (created first thing in the Tune trial function);
- first step: the timestamp of ``train/loss`` at step 1, minus one step's duration (the median gap
  between later steps), so the result is the setup alone, not the first step's compute.

    python bench/bench_sweep.py [--trials 4] [--steps 4] [--out bench/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from xling.api.tags import ROLE, ROLE_TRIAL, TRIAL, tag_is

ROOT = Path(__file__).resolve().parents[1]


def bench_experiment(trials: int, steps: int, out_dir: Path):
    from xling.api.spec.loading import load_experiment, parse_experiment

    exp = load_experiment(ROOT / "manifests/samples/smoke.yaml")
    doc = exp.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["metadata"]["name"] = "bench-sweep"
    spec = doc["spec"]
    spec["evaluation"] = {"atStart": False, "suites": []}
    spec["optimization"].update(maxSteps=steps, checkpointEvery=0, logEvery=1, warmupSteps=0)
    spec["outputDir"] = str(out_dir / "runs")
    alphas = [round((i + 1) / (trials + 1), 3) for i in range(trials)]
    spec["sweep"] = {"parameters": {"sampling.alpha": {"grid": alphas}}, "seeds": [0], "metric": "train/loss",
                     "mode": "min", "bootstrapSamples": 100}  # fmt: skip
    return parse_experiment(doc, "bench")


def trial_timings(uri: str, experiment: str) -> list[dict[str, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], tag_is(ROLE, ROLE_TRIAL), order_by=["attributes.start_time"]
    )
    rows = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        stamps = [m.timestamp for m in history]
        step_ms = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        rows.append({
            "trial": run.data.tags[TRIAL],
            "overhead_s": (stamps[0] - step_ms - run.info.start_time) / 1000,
            "step_s": step_ms / 1000,
            "trial_s": (run.info.end_time - run.info.start_time) / 1000,
        })  # fmt: skip
    for row, run, nxt in zip(
        rows, runs, runs[1:], strict=False
    ):  # Tune's part: one trial's end -> next start
        row["gap_to_next_s"] = (nxt.info.start_time - run.info.end_time) / 1000
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    from xling.trainer.sweep.tune import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        uri = f"sqlite:///{tmp}/mlflow.db"
        started = time.time()
        run_sweep(bench_experiment(args.trials, args.steps, Path(tmp)), tracking_uri=uri)
        wall = time.time() - started
        rows = trial_timings(uri, "bench-sweep")
    overheads = [r["overhead_s"] for r in rows]
    print(
        f"\n{'trial':<8}{'start->step 1 (s)':>20}{'one step (s)':>14}{'trial (s)':>11}{'gap to next (s)':>17}"
    )
    for r in rows:
        gap = f"{r['gap_to_next_s']:.1f}" if "gap_to_next_s" in r else "-"
        print(f"{r['trial']:<8}{r['overhead_s']:>20.1f}{r['step_s']:>14.2f}{r['trial_s']:>11.1f}{gap:>17}")
    print(f"overhead per trial: median {statistics.median(overheads):.1f}s, min {min(overheads):.1f}s, "
          f"max {max(overheads):.1f}s; sweep of {len(rows)} trials: {wall:.0f}s wall (with Ray start and summary)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"trials": rows, "median_overhead_s": statistics.median(overheads), "sweep_wall_s": wall,
                  "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
