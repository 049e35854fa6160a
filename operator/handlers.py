"""kopf handlers: translate kopf's arguments, delegate to :mod:`xling.operator.reconcile`, post events.

Registered on kopf's default registry, so ``kopf run -m xling.operator.handlers`` works as well as
``python -m xling.operator``. Handlers are sync: kopf runs them in its thread pool next to the sync client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from xling.api.env import CONSISTENCY_TIMEOUT_ENV, MAX_WORKERS_ENV, METRICS_PORT_ENV, WATCHDOG_INTERVAL_ENV
from xling.api.spec.base import API_VERSION, KIND
from xling.operator import reconcile as rc
from xling.operator.crd import GROUP, PLURAL, VERSION
from xling.operator.defaults import Platform
from xling.operator.kube import Kube
from xling.operator.manifests import MANAGED_BY
from xling.operator.metrics import Metrics

FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)
RAYJOBS = ("ray.io", "v1", "rayjobs")
OURS = {"app.kubernetes.io/managed-by": MANAGED_BY}


#: The context variables kopf.event() posts through (one queue for the whole operator), which kopf sets only
#: while it processes an object: the watchdog loop takes them from there.
_EVENT_VARS = ("event_queue_loop_var", "event_queue_var")


@kopf.index(*RESOURCE)
def experiments(
    body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every experiment as last seen (listed at start, then watched): the watchdog's work list and the phase
    gauge, so both are whole again right after a restart."""
    if not memo.event_vars:  # a dict the operator's memo shares with the per-object copies kopf makes
        memo.event_vars.update((v, x) for v, x in contextvars.copy_context().items() if v.name in _EVENT_VARS)
    return {(namespace, name): copy.deepcopy(dict(body))}


def _phases(index: kopf.Index) -> list[tuple[str, str]]:
    return [
        (namespace, (body.get("status") or {}).get("phase") or "")
        for (namespace, _), bodies in index.items()
        for body in bodies
    ]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, experiments: kopf.Index, **_: Any) -> None:
    """Own annotation prefix and finalizer name; quiet kopf's per-handler events; one API client."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER  # none is added now; kopf removes it from older experiments
    settings.posting.reporting_component = MANAGED_BY
    settings.posting.level = logging.WARNING  # our own transition events use kopf.event(), which ignores it
    settings.execution.max_workers = int(os.environ.get(MAX_WORKERS_ENV, "16"))
    settings.watching.server_timeout = 600  # restart watches regularly: survives silent connection drops
    settings.watching.client_timeout = 660
    settings.networking.request_timeout = 30
    # kopf waits this long for its own patch to come back before handling newer events of that object. The
    # status writes of other handlers interleave, so the exact version is often skipped and kopf waits it out;
    # the handlers re-read what they need and are idempotent, so a short wait is safe (measured: bench/).
    settings.persistence.consistency_timeout = float(os.environ.get(CONSISTENCY_TIMEOUT_ENV, "1"))
    memo.setdefault("event_vars", {})
    memo.setdefault("watchdog_interval", float(os.environ.get(WATCHDOG_INTERVAL_ENV, "60")))
    if memo.get("platform") is None:
        memo.platform = Platform.load()  # a broken defaults file stops the operator here, with its path
    if memo.get("metrics") is None:
        memo.metrics = Metrics(phases=lambda: _phases(experiments))
        if port := os.environ.get(METRICS_PORT_ENV):
            memo.metrics.serve(int(port))
    if memo.get("kube") is None:
        memo.kube = Kube.from_environment()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the operator's client credentials (in-cluster, else kubeconfig)."""
    return memo.kube.connection_info()


@kopf.on.startup()
async def start_watchdog(memo: kopf.Memo, experiments: kopf.Index, **_: Any) -> None:
    memo.watchdog_task = asyncio.create_task(watchdog(memo, experiments))


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if (task := memo.get("watchdog_task")) is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if memo.get("kube") is not None:
        memo.kube.close()


@kopf.on.probe(id="api")
def probe(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: kopf serves this at --liveness URL; an exception here fails the probe."""
    return "ok" if memo.get("kube") is not None else "starting"


def _ref(namespace: str, name: str, uid: str | None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
    }


def _write(memo: kopf.Memo, namespace: str, name: str, uid: str | None, update: Any) -> None:
    """Status through the single writer, then one event per transition."""

    def written(old: Mapping[str, Any], patch: dict[str, Any]) -> None:
        memo.metrics.observe(old, patch)

    try:
        events = rc.write_status(memo.kube, namespace, name, update, written=written)
    except rc.StatusConflict as err:
        raise kopf.TemporaryError(str(err), delay=1) from err
    for ev in events:
        kopf.event(_ref(namespace, name, uid), type=ev.type, reason=ev.reason, message=ev.message)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Create the children, or apply what may change (suspend, deadlines); refuse the rest via Validated."""
    try:
        update = rc.reconcile(memo.kube, body, memo.platform)
    except rc.ForeignChild as err:
        memo.metrics.errors.labels("spec").inc()
        raise kopf.TemporaryError(str(err), delay=30) from err
    _write(memo, namespace, name, body.metadata.uid, update)
    if update.retry_after is not None:  # e.g. KubeRay not installed yet: try again until it is
        raise kopf.TemporaryError("waiting for the cluster (see status.conditions)", delay=update.retry_after)


@kopf.on.event(*RESOURCE)
def experiment_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """On deletion, mark an unfinished MLflow run KILLED (else it stays RUNNING forever). Best effort, from the
    DELETED event: no finalizer, so deleting a namespace never waits for an operator that is gone; the children
    go by ownerReference garbage collection."""
    if type != "DELETED":
        return
    try:
        if rc.close_mlflow_run(memo.kube, body, datetime.datetime.now(datetime.UTC), memo.platform):
            logger.info("marked the MLflow run KILLED")
    except OSError as err:  # an unreachable MLflow
        logger.warning(f"could not close the MLflow run: {err}")


@kopf.on.event(*RAYJOBS, labels=OURS)
def rayjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Mirror the RayJob's jobDeploymentStatus/jobStatus into its owner's conditions."""
    owner = rc.owner_of(body)
    if owner is not None:
        _write(memo, *owner, rc.mirror_rayjob(body, deleted=type == "DELETED"))


async def watchdog(memo: kopf.Memo, experiments: kopf.Index) -> None:
    """Level-based RayJob mirror, no-progress watchdog, MLflow links and final results for every experiment,
    every memo.watchdog_interval seconds (read each round: settings, tests).

    One loop over the operator's index rather than a kopf daemon per experiment: kopf puts a finalizer on every
    object with a daemon, and a finalizer makes deleting a namespace hang while the operator is down.
    """
    while True:
        await asyncio.sleep(memo.watchdog_interval)
        for var, value in memo.event_vars.items():  # this task's own context: kopf.event works
            var.set(value)
        now = datetime.datetime.now(datetime.UTC)
        bodies = [body for _, found in list(experiments.items()) for body in found]
        looks = await asyncio.gather(
            *(asyncio.to_thread(_look, memo, body, now) for body in bodies), return_exceptions=True
        )
        for failed in (e for e in looks if isinstance(e, Exception)):  # the loop outlives any one experiment
            memo.metrics.errors.labels("watchdog").inc()
            logging.getLogger(__name__).error(f"watchdog: {failed!r}")


def _look(memo: kopf.Memo, body: Mapping[str, Any], now: datetime.datetime) -> None:
    namespace, name, uid = (
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        body["metadata"].get("uid"),
    )

    def update(fresh: Mapping[str, Any]) -> rc.StatusUpdate:
        return rc.watch_progress(memo.kube, fresh, now, platform=memo.platform)

    try:
        if (mirror := rc.resync(memo.kube, body, now)) is not None:  # a lost RayJob event is caught here
            _write(memo, namespace, name, uid, mirror)
        if rc.needs_watch(body.get("status") or {}):
            _write(memo, namespace, name, uid, update)
    except (OSError, kopf.TemporaryError) as err:  # MLflow down or a busy object: try next round
        memo.metrics.errors.labels("watchdog").inc()
        logging.getLogger(__name__).warning(f"watchdog {namespace}/{name}: {err}")
