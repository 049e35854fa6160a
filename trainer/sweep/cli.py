"""``xling results SWEEP``: a sweep's summary rebuilt from MLflow, printed, and written or published.

The summary's imports (numpy) come at the top on purpose: an image without them gets no ``results``
command rather than one that fails when run (``xling.trainer.cli`` skips what it cannot import).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from xling.api.contracts import DEFAULT_TRACKING_URI
from xling.api.errors import InputError
from xling.api.tags import parents_of_sweep
from xling.trainer.headline import find_run, headline, summary_line, table
from xling.trainer.sweep.report import publish, write_report
from xling.trainer.sweep.summary import summarize_sweep
from xling.trainer.sweep.tables import markdown

if TYPE_CHECKING:
    from mlflow import MlflowClient


def find_parent(client: MlflowClient, sweep: str) -> str:
    """A parent run id, or the newest sweep parent run tagged with that sweep name."""
    if re.fullmatch(r"[0-9a-f]{32}", sweep):
        return sweep
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids,
        filter_string=parents_of_sweep(sweep),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise InputError(None, f"no sweep named {sweep!r} in {client.tracking_uri} (give the parent run id?)")
    return runs[0].info.run_id


def _results(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from xling.trainer.tracking import resolve_tracking_uri

    name, uri, exp = args.sweep, args.tracking_uri, None
    if Path(args.sweep).is_file():
        from xling.api.spec.loading import load_experiment

        exp = load_experiment(args.sweep)
        name, uri = exp.metadata.name, uri or exp.spec.tracking.tracking_uri
    elif args.full_pool:
        raise InputError(
            None,
            f"give the sweep's YAML file (it names the suite and model), not {name!r}",
            field="--full-pool",
        )
    client = MlflowClient(resolve_tracking_uri(uri))
    try:
        parent = find_parent(client, name)
    except InputError:  # no sweep: a single run of that name says what it has
        if args.full_pool or (run := find_run(client, name)) is None:
            raise
        rows, step = headline(client, run)
        print(f"{name!r} is a single run ({run}), not a sweep; {summary_line(rows)}:\n\n{table(rows, step)}")
        return 0
    summary = summarize_sweep(client, parent)
    if args.full_pool and exp is not None:
        from xling.trainer.sweep.full_pool import evaluate_full_pool

        if evaluate_full_pool(client, summary, exp):
            summary = summarize_sweep(client, parent)
    print(markdown(summary), end="")
    if args.out:
        for path in write_report(summary, Path(args.out)):
            print(f"wrote {path}")
    if args.publish:
        publish(client, summary)
        print(f"updated the summary on parent run {summary.parent_run_id}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``xling results SWEEP``: the sweep's summary, rebuilt from MLflow (works mid-sweep too)."""
    p = subparsers.add_parser(
        "results",
        help="print a sweep's summary (mean and CI per point, bootstrap between points) from MLflow, or a "
        "single run's zero-shot -> trained headline",
        description="Rebuild a sweep's summary from its MLflow runs and print it.",
    )
    p.add_argument("sweep", help="the sweep's YAML file, its metadata.name, or its parent run id")
    p.add_argument(
        "--tracking-uri", help=f"MLflow tracking URI (default: the spec's, else {DEFAULT_TRACKING_URI})"
    )
    p.add_argument(
        "--out", metavar="DIR", help="also write summary.md/html/json, points.csv and the plots here"
    )
    p.add_argument(
        "--publish", action="store_true", help="also replace the summary artifacts on the parent run"
    )
    p.add_argument(
        "--full-pool",
        action="store_true",
        help="first evaluate each point's best seed and the zero-shot model on the whole suite (not the "
        "sweep's slice), once: a rerun skips what MLflow already has",
    )
    p.set_defaults(func=_results)
    return p
