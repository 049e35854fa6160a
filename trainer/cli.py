"""The ``xling`` command; subcommands import their heavy parts lazily.

Its help text is :data:`DESCRIPTION` (plain text: argparse prints it as it is)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from xling.api.contracts import DEFAULT_TRACKING_URI
from xling.api.env import EXPERIMENT_UID_ENV
from xling.api.errors import RunFailed, command, failure_reason, training_failed
from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.loading import load_experiment
from xling.trainer.console import QuietConsole


def _run(args: argparse.Namespace) -> int:
    from xling.trainer.driver import skipping_bad_rows
    from xling.trainer.preflight import check

    exp = skipping_bad_rows(load_experiment(args.file), args.skip_bad_rows)
    # plan-only models, the memory plan, paths, languages, the model, ignored fields: before any work. A run
    # leaves loading the model's files to driver.prepare_run, which loads them before Ray starts.
    points: list[tuple[str, ExperimentSpec]] = []
    if exp.spec.sweep is not None:  # each point is sized, as prepare_run will (not the base values)
        from xling.trainer.sweep.trials import plan_sweep, point_specs

        points = point_specs(exp, plan_sweep(exp))
    check(exp, args.file, ahead=args.check, points=points)
    if args.check:
        print(f"{args.file}: ready to run RetrievalExperiment {exp.metadata.name!r}")
        return 0
    if exp.spec.sweep is not None:  # one Ray Tune trial per point and seed
        from xling.trainer.sweep.tune import run_sweep as drive
    else:
        from xling.trainer.run import run_experiment as drive
    output = exp.spec.output_dir
    local = "://" not in output and not os.environ.get(EXPERIMENT_UID_ENV)  # a cluster's driver: the pod log
    log = (
        Path(output) / "logs" / f"{exp.metadata.name}-{time.strftime('%Y%m%d-%H%M%S')}.log" if local else None
    )
    if log:
        print(f"log: {log} (evaluation tables, the libraries' output, tracebacks)", flush=True)
    try:
        with QuietConsole(log) if log else contextlib.nullcontext():
            drive(exp, tracking_uri=args.tracking_uri)  # exp carries --skip-bad-rows
    except Exception as err:
        if not training_failed(err):
            raise
        raise RunFailed(failure_reason(err) + (f" (details: {log})" if log else "")) from err
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from xling.trainer.driver import prepare_data, skipping_bad_rows
    from xling.trainer.preflight import check

    exp = skipping_bad_rows(load_experiment(args.file), args.skip_bad_rows)
    check(exp, args.file, run=False)
    prepared = prepare_data(exp)
    corpus = prepared.corpus
    print(f"{corpus.num_pairs()} pairs in {len(corpus)} groups, languages {corpus.sizes()}, "
          f"index {corpus.meta['index_bytes'] / max(1, corpus.num_pairs()):.1f} bytes per pair")  # fmt: skip
    return 0


def _mine(args: argparse.Namespace) -> int:
    from xling.api.spec.training import HardNegativesSpec, MineSpec
    from xling.trainer.driver import prepare_data

    exp = load_experiment(args.file)
    data = exp.spec.data
    if not (data.hard_negatives and data.hard_negatives.mine):  # the defaults, to look before configuring
        data = data.model_copy(update={"hard_negatives": HardNegativesSpec(mine=MineSpec())})
        exp = exp.model_copy(update={"spec": exp.spec.model_copy(update={"data": data})})
    meta = prepare_data(exp).mined
    print(f"{meta['negatives']} negatives for {meta['with_negatives']} of {meta['passages']} passages; "
          f"removed {meta['removed']}; negatives/{meta['key']}")  # fmt: skip
    return 0


DESCRIPTION = """Train and evaluate multilingual dense retrievers with X-X, X-Y, hybrid or mixed batches, on Ray
and DeepSpeed, locally or on Kubernetes. One experiment is one YAML file (a RetrievalExperiment);
start with: xling run manifests/samples/smoke.yaml (docs: README.md)."""


def version() -> str:
    """The installed distribution's version (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("xling")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xling", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment YAML (a RetrievalExperiment) on local Ray")
    run.add_argument("file")
    run.add_argument("--tracking-uri", help=f"MLflow tracking URI (default: {DEFAULT_TRACKING_URI})")
    run.add_argument(
        "--skip-bad-rows", action="store_true", help="count and report bad data rows instead of failing"
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="only check the file and what it names (paths, languages, the model), then exit",
    )
    run.set_defaults(func=_run)
    data = sub.add_parser("data", help="training data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser(
        "prepare", help="prepare the spec's training corpus in its storage (xling run does too)"
    )
    prep.add_argument("file")
    prep.add_argument(
        "--skip-bad-rows", action="store_true", help="count and report bad data rows instead of failing"
    )
    prep.set_defaults(func=_prepare)
    mine = sub.add_parser(
        "mine", help="mine hard negatives into the prepared corpus (data.hardNegatives.mine)"
    )
    mine.add_argument("file")
    mine.set_defaults(func=_mine)
    # Here, not at the top: ``import xling.trainer.cli`` (tests, ``main``) stays as light as the spec. None of
    # these imports torch, Ray or kopf at module level: every image with the base dependencies has them all.
    from xling.operator import render
    from xling.trainer import export
    from xling.trainer.capacity import cli as capacity_cli
    from xling.trainer.evaluation import cli as evaluation_cli
    from xling.trainer.sweep import cli as sweep_cli

    for module in (evaluation_cli, render, sweep_cli, capacity_cli, export):
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return command(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
