"""The operator's logic, free of kopf: the handlers translate kopf's arguments and call these.

Level-based and idempotent: every call reads what exists and converges on what the spec asks for, so a
restart mid-reconcile never duplicates a RayJob (names are deterministic; a 409 means "exists, read it").
Status has one writer, :func:`write_status`, which re-reads the resource and patches /status guarded by
resourceVersion, so the spec handlers, the RayJob mirror and the watchdog never overwrite each other.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from xling.operator import conditions as cnd
from xling.operator import manifests as mf
from xling.operator.conditions import Cond
from xling.operator.kube import Conflict
from xling.operator.manifests import validate
from xling.operator.progress import Mlflow, language_breakdown, ms_to_iso
from xling.trainer.spec import API_VERSION, KIND, SpecError, SweepSpec

STATUS_RETRIES = 8


class KubeLike(Protocol):
    """What reconcile needs from :class:`xling.operator.kube.Kube` (tests pass an in-memory fake)."""

    def create_configmap(self, body: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_configmap(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_secret_data(self, namespace: str, name: str) -> dict[str, str]: ...
    def create_rayjob(self, body: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_rayjob(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_experiment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_experiment_status(
        self, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None: ...


class StatusConflict(Exception):
    """The resource kept changing under us; the caller retries later."""


class ForeignChild(Exception):
    """A child with our deterministic name belongs to another owner (e.g. a deleted namesake not yet GC'd)."""


@dataclass(frozen=True)
class StatusUpdate:
    conditions: list[Cond] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    #: True when the update reflects the current spec generation (spec handlers only).
    observes_spec: bool = False


@dataclass(frozen=True)
class Transition:
    """One Kubernetes Event: a condition flipped, or (when none did) the phase moved."""

    type: str
    reason: str
    message: str


def invalid(err: Exception) -> StatusUpdate:
    return StatusUpdate([Cond("Validated", "False", "InvalidSpec", str(err))], observes_spec=True)


def _create_or_read(
    create: Callable[[dict[str, Any]], Any], read: Callable[[str, str], Any], body: dict[str, Any]
) -> dict[str, Any]:
    """Create; if it exists already (a restart mid-reconcile), read it instead."""
    try:
        return create(body) or read(body["metadata"]["namespace"], body["metadata"]["name"])
    except Conflict:
        return read(body["metadata"]["namespace"], body["metadata"]["name"])


def _check_owner(child: Mapping[str, Any], owner: mf.Owner) -> None:
    uids = {r.get("uid") for r in (child.get("metadata") or {}).get("ownerReferences") or []}
    if owner.uid and owner.uid not in uids:
        name = child["metadata"]["name"]
        raise ForeignChild(f"{child.get('kind', 'object')} {name} exists but is not owned by this experiment")


def reconcile(kube: KubeLike, body: Mapping[str, Any]) -> StatusUpdate:
    """Create the ConfigMap and RayJob, or apply allowed changes to them; report everything else."""
    owner = mf.Owner.from_body(dict(body))
    try:
        exp = validate(body)
    except SpecError as err:
        return invalid(err)
    names = {"rayJobName": mf.rayjob_name(owner.name), "configMapName": mf.configmap_name(owner.name)}
    wanted_cm = mf.configmap(exp, owner)
    current_cm = kube.read_configmap(owner.namespace, names["configMapName"])
    if current_cm is None:
        current_cm = _create_or_read(kube.create_configmap, kube.read_configmap, wanted_cm)
    _check_owner(current_cm, owner)
    running = yaml.safe_load((current_cm.get("data") or {}).get(mf.SPEC_KEY) or "{}") or {}
    changed = mf.immutable_changes(running.get("spec") or {}, mf.resolved_document(exp, owner)["spec"])
    if changed:
        return StatusUpdate(
            [
                Cond(
                    "Validated",
                    "False",
                    "ImmutableFieldChanged",
                    f"{', '.join(changed)}: cannot change after creation (only spec.suspend and spec.deadlines "
                    "can); the RayJob keeps the original spec. Revert it, or delete and re-create the experiment.",
                )
            ],
            names,
            observes_spec=True,
        )
    if current_cm.get("data") != wanted_cm["data"]:
        kube.patch_configmap(owner.namespace, names["configMapName"], {"data": wanted_cm["data"]})

    ok = StatusUpdate([Cond("Validated", "True", "SpecValid", "spec is valid")], names, observes_spec=True)
    current_rj = kube.read_rayjob(owner.namespace, names["rayJobName"])
    if current_rj is None:
        if (body.get("status") or {}).get("rayJobName"):  # it existed: deleted by hand
            return StatusUpdate(ok.conditions + cnd.rayjob_deleted(), names, observes_spec=True)
        _create_or_read(kube.create_rayjob, kube.read_rayjob, mf.rayjob(exp, owner))
        return ok
    _check_owner(current_rj, owner)
    wanted = mf.mutable_rayjob_fields(exp.spec)
    if any((current_rj.get("spec") or {}).get(k) != v for k, v in wanted.items()):
        kube.patch_rayjob(owner.namespace, names["rayJobName"], {"spec": wanted})
    return ok


def owner_of(rayjob: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(namespace, name, uid) of the RetrievalExperiment controlling a RayJob."""
    meta = rayjob.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION and ref.get("controller"):
            return meta.get("namespace") or "default", ref["name"], ref.get("uid")
    return None


def mirror_rayjob(rayjob: Mapping[str, Any], deleted: bool) -> Callable[[Mapping[str, Any]], StatusUpdate]:
    """How a RayJob event changes its owner's status (decided against the owner's fresh body)."""
    status = rayjob.get("status") or {}

    def update(owner: Mapping[str, Any]) -> StatusUpdate:
        ostatus = owner.get("status") or {}
        if ostatus.get("phase") in cnd.TERMINAL_PHASES or (owner.get("metadata") or {}).get(
            "deletionTimestamp"
        ):
            return StatusUpdate()
        if deleted:
            return StatusUpdate(cnd.rayjob_deleted())
        dashboard = status.get("dashboardURL")
        return StatusUpdate(
            cnd.from_rayjob(status),
            {
                "jobDeploymentStatus": status.get("jobDeploymentStatus"),
                "jobStatus": status.get("jobStatus"),
                "dashboardUrl": (dashboard if "://" in dashboard else f"http://{dashboard}")
                if dashboard
                else None,
            },
        )

    return update


def _age_seconds(iso: str, now: datetime.datetime) -> float:
    return (now - datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()


def needs_watch(status: Mapping[str, Any]) -> bool:
    """Running experiments, and finished ones whose results are not in status yet."""
    phase = status.get("phase")
    return phase == "Running" or (phase in cnd.TERMINAL_PHASES and status.get("metrics") is None)


def watch_progress(
    kube: KubeLike, body: Mapping[str, Any], now: datetime.datetime, client: Callable[..., Mlflow] = Mlflow
) -> StatusUpdate:
    """The watchdog: Progressing=False when no metric reached MLflow for deadlines.noProgressSeconds.

    Also fills the MLflow links and, once the job is done, the final metrics and per-language summary.
    """
    status = body.get("status") or {}
    phase = status.get("phase")
    if not needs_watch(status):
        return StatusUpdate()
    try:
        exp = validate(body)
    except SpecError:
        return StatusUpdate()
    tracking, limit = exp.spec.tracking, exp.spec.deadlines.no_progress_seconds
    if not Mlflow.supports(tracking.tracking_uri):
        if phase != "Running":
            return StatusUpdate(fields={"metrics": {}})  # nothing to fetch: stop looking
        why = "the MLflow tracking URI is not http(s), so progress cannot be watched"
        return StatusUpdate([Cond("Progressing", "Unknown", "NoTrackingServer", why)])
    creds = (
        kube.read_secret_data(body["metadata"]["namespace"], tracking.credentials.name)
        if tracking.credentials
        else {}
    )
    mlflow = client(tracking.tracking_uri, creds)
    report = mlflow.report(tracking.experiment_name or exp.metadata.name, body["metadata"].get("uid", ""))
    fields: dict[str, Any] = {}
    conds: list[Cond] = []
    if report is not None:
        links = {
            "experimentId": report.experiment_id,
            "experimentUrl": mlflow.experiment_url(report.experiment_id),
        }
        if report.run_id:
            links |= {"runId": report.run_id, "runUrl": mlflow.run_url(report.experiment_id, report.run_id)}
        fields["mlflow"] = links
        if report.last_metric_ms:
            fields["lastMetricTime"] = ms_to_iso(report.last_metric_ms)
    if phase == "Running" and limit:
        since = fields.get("lastMetricTime") or next(
            (c["lastTransitionTime"] for c in status.get("conditions", []) if c.get("type") == "Running"),
            None,
        )
        age = _age_seconds(since, now) if since else 0.0
        if age > limit:
            conds.append(
                Cond("Progressing", "False", "NoProgress", f"no metric reached MLflow for {int(age)} s")
            )
        else:
            conds.append(Cond("Progressing", "True", "MetricsArriving", f"last metric {int(age)} s ago"))
    if phase in cnd.TERMINAL_PHASES:  # the driver has exited, so MLflow has all there will be
        metric = (exp.spec.sweep or SweepSpec()).metric
        fields["metrics"] = report.metrics if report else {}
        if report and metric in report.metrics:
            fields["best"] = {"metric": metric, "value": report.metrics[metric]}
            fields["languages"] = language_breakdown(metric, report.metrics)
    return StatusUpdate(conds, fields)


def close_mlflow_run(kube: KubeLike, body: Mapping[str, Any], now: datetime.datetime) -> bool:
    """On deletion of an unfinished experiment, mark its MLflow run KILLED (else it stays RUNNING forever)."""
    status = body.get("status") or {}
    run_id = (status.get("mlflow") or {}).get("runId")
    if status.get("phase") in cnd.TERMINAL_PHASES or not run_id:
        return False
    try:
        exp = validate(body)
    except SpecError:
        return False
    tracking = exp.spec.tracking
    if not Mlflow.supports(tracking.tracking_uri):
        return False
    creds = (
        kube.read_secret_data(body["metadata"]["namespace"], tracking.credentials.name)
        if tracking.credentials
        else {}
    )
    Mlflow(tracking.tracking_uri, creds).kill_run(run_id, int(now.timestamp() * 1000))
    return True


def _new_status(
    body: Mapping[str, Any], update: StatusUpdate, now: str
) -> tuple[dict[str, Any], list[Transition]]:
    """The status patch (only what differs) and the transitions it makes."""
    status = dict(body.get("status") or {})
    generation = (body.get("metadata") or {}).get("generation")
    observed = generation if update.observes_spec else status.get("observedGeneration")
    existing = status.get("conditions") or []
    have = {c.get("type") for c in existing}
    seed = [c for c in cnd.initial_conditions() if c.type not in have]
    conds, changed = cnd.merge_conditions(existing, seed + update.conditions, observed, now)
    merged = {**status, **update.fields, "conditions": conds}
    if observed is not None:
        merged["observedGeneration"] = observed
    merged["phase"] = cnd.phase_of(conds, merged.get("jobDeploymentStatus"))
    patch = {k: v for k, v in merged.items() if status.get(k) != v}
    seeded = {c.type for c in seed}
    events = [
        Transition(
            "Warning" if c.warning else "Normal", c.reason, f"{c.type}={c.status}: {c.message}".rstrip(": ")
        )
        for c in changed
        if c.type not in seeded or c in update.conditions
    ]
    if not events and "phase" in patch and status.get("phase"):
        events = [Transition("Normal", merged["phase"], f"phase {status['phase']} -> {merged['phase']}")]
    return patch, events


def write_status(
    kube: KubeLike,
    namespace: str,
    name: str,
    update: StatusUpdate | Callable[[Mapping[str, Any]], StatusUpdate],
    now: str | None = None,
) -> list[Transition]:
    """Read, compute, patch /status with a resourceVersion precondition; retry on conflict."""
    for _ in range(STATUS_RETRIES):
        body = kube.read_experiment(namespace, name)
        if body is None:
            return []
        upd = update(body) if callable(update) else update
        patch, transitions = _new_status(body, upd, now or cnd.now_iso())
        if not patch:
            return []
        rv = (body.get("metadata") or {}).get("resourceVersion")
        try:
            kube.patch_experiment_status(
                namespace, name, {"metadata": {"resourceVersion": rv}, "status": patch}
            )
        except Conflict:
            continue
        return transitions
    raise StatusConflict(f"{namespace}/{name}: status kept changing; will retry")
