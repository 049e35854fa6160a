"""``python -m xling.operator``: run the operator with settings for a real cluster.

Run exactly ONE replica with the Deployment strategy ``Recreate``: kopf has no leader election, and two live
replicas would both reconcile every experiment (``--standalone`` turns kopf's peering off, so nothing would
pause the second one). Liveness: GET /healthz on ``--liveness`` (default :8080). Logs: one JSON object per line.
"""

from __future__ import annotations

import argparse
import os

import kopf

import xling.operator.handlers  # noqa: F401  (registers the handlers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m xling.operator", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[n for n in env("XLING_WATCH_NAMESPACES", "").split(",") if n],
        help="watch only these namespaces (repeatable; env XLING_WATCH_NAMESPACES=a,b); default: all",
    )
    p.add_argument(
        "--liveness", default=env("XLING_LIVENESS", "http://0.0.0.0:8080/healthz"), help="probe URL"
    )
    p.add_argument("--log-format", choices=["json", "plain"], default=env("XLING_LOG_FORMAT", "json"))
    p.add_argument("--verbose", action="store_true", default=env("XLING_VERBOSE") == "1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fmt = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=fmt, log_refkey="object")
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
