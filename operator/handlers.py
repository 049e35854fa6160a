"""kopf handlers: translate kopf's arguments, delegate to :mod:`xling.operator.reconcile`, post events.

Registered on kopf's default registry, so ``kopf run -m xling.operator.handlers`` works as well as
``python -m xling.operator``. Handlers are sync: kopf runs them in its thread pool next to the sync client.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from xling.operator import reconcile as rc
from xling.operator.crd import GROUP, PLURAL, VERSION
from xling.operator.defaults import Platform
from xling.operator.kube import Kube
from xling.operator.manifests import MANAGED_BY
from xling.operator.metrics import Metrics
from xling.trainer.spec import API_VERSION, KIND

FINALIZER = f"{GROUP}/finalizer"
RESOURCE = (GROUP, VERSION, PLURAL)
RAYJOBS = ("ray.io", "v1", "rayjobs")
OURS = {"app.kubernetes.io/managed-by": MANAGED_BY}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Own annotation prefix and finalizer name; quiet kopf's per-handler events; one API client."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.reporting_component = MANAGED_BY
    settings.posting.level = logging.WARNING  # our own transition events use kopf.event(), which ignores it
    settings.execution.max_workers = int(os.environ.get("XLING_MAX_WORKERS", "16"))
    settings.watching.server_timeout = 600  # restart watches regularly: survives silent connection drops
    settings.watching.client_timeout = 660
    settings.networking.request_timeout = 30
    # kopf waits this long for its own patch to come back before handling newer events of that object. The
    # status writes of other handlers interleave, so the exact version is often skipped and kopf waits it out;
    # the handlers re-read what they need and are idempotent, so a short wait is safe (measured: bench/).
    settings.persistence.consistency_timeout = float(os.environ.get("XLING_CONSISTENCY_TIMEOUT", "1"))
    memo.setdefault("watchdog_interval", float(os.environ.get("XLING_WATCHDOG_INTERVAL", "60")))
    if memo.get("platform") is None:
        memo.platform = Platform.load()  # a broken defaults file stops the operator here, with its path
    if memo.get("metrics") is None:
        memo.metrics = Metrics()
        if port := os.environ.get("XLING_METRICS_PORT"):
            memo.metrics.serve(int(port))
    if memo.get("kube") is None:
        memo.kube = Kube.from_environment()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the operator's client credentials (in-cluster, else kubeconfig)."""
    return memo.kube.connection_info()


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
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
        memo.metrics.observe(namespace, name, old, patch)

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


@kopf.on.delete(*RESOURCE, retries=3, backoff=5)
def deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Children go by ownerReference GC; only an unfinished MLflow run needs closing (hence the finalizer)."""
    memo.metrics.forget(body.metadata.namespace, body.metadata.name)
    try:
        if rc.close_mlflow_run(memo.kube, body, datetime.datetime.now(datetime.UTC), memo.platform):
            logger.info("marked the MLflow run KILLED")
    except OSError as err:  # an unreachable MLflow must not block deletion forever
        logger.warning(f"could not close the MLflow run: {err}")


@kopf.on.event(*RAYJOBS, labels=OURS)
def rayjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Mirror the RayJob's jobDeploymentStatus/jobStatus into its owner's conditions."""
    owner = rc.owner_of(body)
    if owner is not None:
        _write(memo, *owner, rc.mirror_rayjob(body, deleted=type == "DELETED"))


@kopf.daemon(*RESOURCE, cancellation_timeout=1)
async def watchdog(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    logger: Any,
    **_: Any,
) -> None:
    """Level-based RayJob mirror, no-progress watchdog, MLflow links and final results, every
    memo.watchdog_interval seconds.

    A daemon rather than a timer so the interval is read at run time (settings, tests); ``body`` is live.
    It ends when ``stopped`` is set (deletion, operator exit); kopf cancels it a second later otherwise.
    """
    while not stopped:
        await stopped.wait(memo.watchdog_interval)
        if stopped:
            continue
        now = datetime.datetime.now(datetime.UTC)

        def update(fresh: Mapping[str, Any], now: datetime.datetime = now) -> rc.StatusUpdate:
            return rc.watch_progress(memo.kube, fresh, now, platform=memo.platform)

        def look() -> None:
            if (mirror := rc.resync(memo.kube, body)) is not None:  # a lost RayJob event is caught here
                _write(memo, namespace, name, body.metadata.uid, mirror)
            if rc.needs_watch(body.get("status") or {}):
                _write(memo, namespace, name, body.metadata.uid, update)

        try:
            await asyncio.to_thread(look)
        except (OSError, kopf.TemporaryError) as err:  # MLflow down or a busy object: try next round
            memo.metrics.errors.labels("watchdog").inc()
            logger.warning(f"watchdog: {err}")
