"""``python -m xling.operator``: run the operator with settings for a real cluster.

With ``--lease-name`` (the Helm chart and the kustomize base set it) replicas elect a leader on a Lease
(:mod:`xling.operator.election`): only the leader runs kopf; a standby answers the probes and waits. Without it
the process serves at once, so run only one (``--standalone`` turns kopf's peering off, nothing would pause a
second one). Liveness: GET /healthz on ``--liveness`` (default :8080). Logs: one JSON object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import aiohttp.web
import kopf
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import xling.operator.handlers  # noqa: F401  (registers the handlers)
from xling.api.env import (
    LEASE_DURATION_ENV,
    LEASE_NAME_ENV,
    LEASE_NAMESPACE_ENV,
    LEASE_RENEW_DEADLINE_ENV,
    LEASE_RETRY_PERIOD_ENV,
    LIVENESS_ENV,
    LOG_FORMAT_ENV,
    METRICS_PORT_ENV,
    VERBOSE_ENV,
    WATCH_NAMESPACES_ENV,
)
from xling.operator.election import Elector, Timings
from xling.operator.kube import Kube
from xling.operator.metrics import Metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m xling.operator", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[n for n in env(WATCH_NAMESPACES_ENV, "").split(",") if n],
        help="watch only these namespaces (repeatable; env XLING_WATCH_NAMESPACES=a,b); default: all",
    )
    p.add_argument("--liveness", default=env(LIVENESS_ENV, "http://0.0.0.0:8080/healthz"), help="probe URL")
    p.add_argument("--log-format", choices=["json", "plain"], default=env(LOG_FORMAT_ENV, "json"))
    p.add_argument("--verbose", action="store_true", default=env(VERBOSE_ENV) == "1")
    lease = Timings()
    p.add_argument(
        "--lease-name",
        default=env(LEASE_NAME_ENV, ""),
        help="elect a leader on this Lease (env XLING_LEASE_NAME); empty: no election, serve at once",
    )
    p.add_argument(
        "--lease-namespace",
        default=env(LEASE_NAMESPACE_ENV, "default"),
        help="the Lease's namespace, the operator's own (env XLING_LEASE_NAMESPACE)",
    )
    p.add_argument("--lease-duration", type=float, default=float(env(LEASE_DURATION_ENV, lease.duration)))
    p.add_argument(
        "--lease-renew-deadline",
        type=float,
        default=float(env(LEASE_RENEW_DEADLINE_ENV, lease.renew_deadline)),
    )
    p.add_argument(
        "--lease-retry-period", type=float, default=float(env(LEASE_RETRY_PERIOD_ENV, lease.retry_period))
    )
    return p.parse_args(argv)


@contextlib.asynccontextmanager
async def standby(url: str, metrics_port: str | None) -> AsyncIterator[None]:
    """While waiting for the Lease, answer the probe URL (a standby is alive and ready: a rolling update waits
    for it) and the metrics port (``xling_leader 0``, so the scrape does not fail); kopf's endpoint and the
    leader's metrics take the ports over once these are closed."""
    where = urlparse(url)
    exposition = generate_latest(Metrics(leader=False).registry)

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"standby": True})

    async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=exposition, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = aiohttp.web.Application()
    app.router.add_get(where.path or "/", healthz)
    app.router.add_get("/metrics", metrics)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, where.hostname, where.port or 80).start()
    if metrics_port:
        await aiohttp.web.TCPSite(runner, "0.0.0.0", int(metrics_port)).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def serve(args: argparse.Namespace) -> int:
    """Run kopf, as the leader when a Lease is named; 1 when leadership was lost (the pod restarts, a standby)."""
    run = {
        "standalone": True,
        "clusterwide": not args.namespace,
        "namespaces": args.namespace,
        "liveness_endpoint": args.liveness,
    }
    if not args.lease_name:
        await kopf.operator(**run)
        return 0
    timings = Timings(args.lease_duration, args.lease_renew_deadline, args.lease_retry_period)
    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    kube = Kube.from_environment(pool_size=2)
    elector = Elector(kube, args.lease_namespace, args.lease_name, identity, timings)
    try:
        async with standby(args.liveness, os.environ.get(METRICS_PORT_ENV)):
            await elector.acquire()
        stop = asyncio.Event()
        operator = asyncio.create_task(kopf.operator(stop_flag=stop, **run))
        holding = asyncio.create_task(elector.hold())
        await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done():  # lost: stop reconciling before a standby may take over
            stop.set()
            await operator
            return 1
        holding.cancel()  # kopf stopped (SIGTERM): hand the Lease over now
        await asyncio.to_thread(elector.release)
        operator.result()
        return 0
    finally:
        kube.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fmt = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=fmt, log_refkey="object")
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
