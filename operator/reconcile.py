"""The operator's logic, free of kopf: the handlers translate kopf's arguments and call these.

Level-based and idempotent: every call reads what exists and converges on what the spec asks for, so a
restart mid-reconcile never duplicates a RayJob (names are deterministic; a 409 means "exists, read it").
Status has one writer, :func:`write_status`, which re-reads the resource and patches /status guarded by
resourceVersion, so the spec handlers, the RayJob mirror and the watchdog never overwrite each other.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from xling.api.spec.base import API_VERSION, KIND, SpecError
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.sweep import SweepSpec
from xling.operator import conditions as cnd
from xling.operator import manifests as mf
from xling.operator.checks import Problem, cluster_problems, preflight
from xling.operator.conditions import BestMetric, Cond, ExperimentStatus, MlflowStatus
from xling.operator.conditions import ConditionReason as Reason
from xling.operator.conditions import ConditionType as Type
from xling.operator.defaults import Platform
from xling.operator.kube import Conflict, NotInstalled
from xling.operator.progress import Mlflow, language_breakdown, ms_to_iso

STATUS_RETRIES = 8
#: A Secret opts in to being read by the operator (for MLflow credentials) with this label set to "true".
SECRET_OPT_IN = f"{mf.GROUP}/operator-readable"
#: Seconds between create attempts while KubeRay's API is missing.
KUBERAY_RETRY_SECONDS = 60


class KubeLike(Protocol):
    """What reconcile needs from :class:`xling.operator.kube.Kube` (tests pass an in-memory fake)."""

    def create_configmap(self, body: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_configmap(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None: ...
    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def read_secret_data(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]: ...
    def read_pvc(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def node_resources(self) -> set[str] | None: ...
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
    #: Status fields to write besides conditions/phase/observedGeneration: only those set are written.
    fields: ExperimentStatus = field(default_factory=ExperimentStatus)
    #: True when the update reflects the current spec generation (spec handlers only).
    observes_spec: bool = False
    #: Seconds after which the spec handler must run again (e.g. KubeRay not installed yet); None = never.
    retry_after: float | None = None


@dataclass(frozen=True)
class Transition:
    """One Kubernetes Event: a condition flipped, or (when none did) the phase moved."""

    type: str
    reason: str
    message: str


def invalid(err: Exception) -> StatusUpdate:
    return StatusUpdate([Cond(Type.VALIDATED, "False", Reason.INVALID_SPEC, str(err))], observes_spec=True)


def refused(problems: list[Problem]) -> StatusUpdate:
    """Validated=False with the first problem's reason and every problem's message."""
    message = "; ".join(m for _, m in problems)
    return StatusUpdate([Cond(Type.VALIDATED, "False", problems[0][0], message)], observes_spec=True)


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


def _resolved(spec: Any) -> Any:
    """A spec with this release's defaults filled in (as written if it no longer validates)."""
    try:
        return ExperimentSpec.model_validate(spec).model_dump(by_alias=True, mode="json", exclude_none=True)
    except ValidationError:
        return spec


def user_changes(configmap: Mapping[str, Any], user_spec: Any) -> list[str]:
    """Immutable paths the user changed since creation: both specs resolved by *this* release, so a default a
    new release adds is never a change, and platform defaults (not part of either) never are."""
    note = ((configmap.get("metadata") or {}).get("annotations") or {}).get(mf.USER_SPEC_ANNOTATION)
    if note:
        created = json.loads(note)
    else:  # written by an older operator: its resolved spec, minus the outputDir it derived from storage
        doc = yaml.safe_load((configmap.get("data") or {}).get(mf.SPEC_KEY) or "{}") or {}
        created = {k: v for k, v in (doc.get("spec") or {}).items() if k != "outputDir"}
        user_spec = {k: v for k, v in (user_spec or {}).items() if k != "outputDir"}
    return mf.immutable_changes(_resolved(created), _resolved(user_spec))


def _immutable_refusal(changed: list[str]) -> Cond:
    return Cond(
        Type.VALIDATED,
        "False",
        Reason.IMMUTABLE_FIELD_CHANGED,
        f"{', '.join(changed)}: cannot change after creation (only spec.suspend and spec.deadlines can; "
        "those were applied); the RayJob keeps the original spec. Revert it, or delete and re-create the "
        "experiment.",
    )


def _content(configmap: Mapping[str, Any]) -> tuple[Any, Any]:
    return configmap.get("data"), (configmap.get("metadata") or {}).get("annotations")


def reconcile(kube: KubeLike, body: Mapping[str, Any], platform: Platform | None = None) -> StatusUpdate:
    """Create the ConfigMap and RayJob, or apply allowed changes to them; report everything else."""
    platform = platform or Platform()
    owner = mf.Owner.from_body(dict(body))
    status = body.get("status") or {}
    if status.get("phase") in cnd.TERMINAL_PHASES:
        return StatusUpdate()  # finished for good; KubeRay may have deleted the RayJob, which is fine
    try:
        exp = platform.experiment(body)
    except SpecError as err:
        return invalid(err)
    names = ExperimentStatus(
        ray_job_name=mf.rayjob_name(owner.name), config_map_name=mf.configmap_name(owner.name)
    )
    current_rj = kube.read_rayjob(owner.namespace, names.ray_job_name)
    # Checked before anything (and any GPU) is allocated; a running job is not refused later because the
    # platform's defaults or the objects it references changed.
    fresh = current_rj is None and not status.get("rayJobName")
    if fresh and (problems := cluster_problems(exp, platform) or preflight(kube, exp, owner.namespace)):
        return refused(problems)
    user_spec = body.get("spec") or {}
    wanted_cm = mf.configmap(exp, owner, user_spec)
    current_cm = kube.read_configmap(owner.namespace, names.config_map_name)
    if current_cm is None:
        current_cm = _create_or_read(kube.create_configmap, kube.read_configmap, wanted_cm)
    _check_owner(current_cm, owner)
    changed = user_changes(current_cm, user_spec)
    if not changed and _content(current_cm) != _content(wanted_cm):
        patch = {"metadata": {"annotations": _content(wanted_cm)[1]}, "data": wanted_cm["data"]}
        kube.patch_configmap(owner.namespace, names.config_map_name, patch)

    verdict = (
        [_immutable_refusal(changed)]
        if changed
        else [Cond(Type.VALIDATED, "True", Reason.SPEC_VALID, "spec is valid")]
    )
    if current_rj is None:
        if status.get("rayJobName"):  # it existed and the experiment is unfinished: deleted by hand
            return StatusUpdate(verdict + cnd.rayjob_deleted(), names, observes_spec=True)
        try:
            _create_or_read(kube.create_rayjob, kube.read_rayjob, mf.rayjob(exp, owner))
        except NotInstalled as err:
            why = f"{err} Install KubeRay (docs/install.md); the operator retries every {KUBERAY_RETRY_SECONDS} s."
            cond = Cond(Type.CLUSTER_READY, "False", Reason.KUBERAY_NOT_INSTALLED, why, warn=True)
            return StatusUpdate(verdict + [cond], observes_spec=True, retry_after=KUBERAY_RETRY_SECONDS)
        ready_reason = cnd.condition_reason(status.get("conditions") or [], Type.CLUSTER_READY)
        if ready_reason == Reason.KUBERAY_NOT_INSTALLED:
            verdict.append(
                Cond(
                    Type.CLUSTER_READY,
                    "False",
                    Reason.PENDING,
                    "KubeRay is installed; waiting for the RayJob",
                )
            )
        return StatusUpdate(verdict, names, observes_spec=True)
    _check_owner(current_rj, owner)
    patch = mf.mutable_patch(current_rj, exp.spec)  # applied even while an immutable edit is refused
    if patch and patch["spec"].get("suspend") and (current_rj.get("spec") or {}).get("deletionStrategy"):
        why = f"spec.suspend: not applied, the job runs on: ttlSecondsAfterFinished: {mf.NOT_SUSPENDABLE}"
        cond = Cond(Type.VALIDATED, "False", Reason.HEAD_KEPT_NOT_SUSPENDABLE, why)
        return StatusUpdate([cond], names, observes_spec=True)
    if patch:
        kube.patch_rayjob(owner.namespace, names.ray_job_name, patch)
    return StatusUpdate(verdict, names, observes_spec=True)


def owner_of(rayjob: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(namespace, name, uid) of the RetrievalExperiment controlling a RayJob."""
    meta = rayjob.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION and ref.get("controller"):
            return meta.get("namespace") or "default", ref["name"], ref.get("uid")
    return None


def mirror_rayjob(
    rayjob: Mapping[str, Any], deleted: bool, pull_failure: str | None = None
) -> Callable[[Mapping[str, Any]], StatusUpdate]:
    """How a RayJob event changes its owner's status (decided against the owner's fresh body).

    ``pull_failure``: what its pods say about image pulls; None when they were not looked at (a watch event),
    and then a reported pull failure stays until the pods are looked at again or the cluster comes up."""
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
        conds = cnd.from_rayjob(status, pull_failure or "")
        if pull_failure is None:
            held = {
                c.get("type")
                for c in ostatus.get("conditions") or []
                if c.get("reason") == Reason.IMAGE_PULL_FAILED
            }
            conds = [c for c in conds if not (c.type in held and c.status == "False")]
        return StatusUpdate(
            conds,
            ExperimentStatus(
                job_deployment_status=status.get("jobDeploymentStatus"),
                job_status=status.get("jobStatus"),
                dashboard_url=(dashboard if "://" in dashboard else f"http://{dashboard}")
                if dashboard
                else None,
            ),
        )

    return update


def unsubmitted_for(rayjob: Mapping[str, Any], limit: int | None, now: datetime.datetime) -> int | None:
    """Seconds since a RayJob started, when its Ray job is still not submitted past ``limit`` (None otherwise).

    KubeRay's preRunningDeadlineSeconds stops counting once it created the submitter (jobDeploymentStatus
    Running), so a submitter pod that never runs would hold the cluster's GPUs forever."""
    status = rayjob.get("status") or {}
    if not limit or status.get("jobDeploymentStatus") != "Running" or status.get("jobStatus"):
        return None
    age = _age_seconds(status["startTime"], now) if status.get("startTime") else 0.0
    return int(age) if age > limit else None


def resync(
    kube: KubeLike, body: Mapping[str, Any], now: datetime.datetime | None = None
) -> Callable[[Mapping[str, Any]], StatusUpdate] | None:
    """Level-based mirror: re-read the RayJob, so a lost watch event never leaves a stale phase; while it
    starts, look at its pods too, so an image that cannot be pulled is reported at once; and end a RayJob whose
    job is not submitted within deadlines.toRunningSeconds (with ``now``: the watchdog)."""
    status = body.get("status") or {}
    name = status.get("rayJobName")
    if not name or status.get("phase") in cnd.TERMINAL_PHASES:
        return None
    namespace, experiment = body["metadata"]["namespace"], body["metadata"]["name"]
    rayjob = kube.read_rayjob(namespace, name)
    limit = ((body.get("spec") or {}).get("deadlines") or {}).get("toRunningSeconds")
    if now is not None and rayjob is not None and (age := unsubmitted_for(rayjob, limit, now)):
        current = (rayjob.get("spec") or {}).get("activeDeadlineSeconds")
        if current is None or current > age:  # KubeRay fails it (DeadlineExceeded) and frees the GPUs
            kube.patch_rayjob(namespace, name, {"spec": {"activeDeadlineSeconds": age}})
    pull_failure = None
    if rayjob is not None and status.get("phase") in ("Pending", "Initializing"):  # pods that cannot start
        pods = kube.list_pods(namespace, f"{mf.EXPERIMENT_LABEL}={experiment}")
        ours = [
            p
            for p in pods
            if ((p.get("metadata") or {}).get("labels") or {}).get(mf.EXPERIMENT_LABEL) == experiment
        ]
        pull_failure = cnd.image_pull_failure(ours)
    return mirror_rayjob(rayjob or {}, deleted=rayjob is None, pull_failure=pull_failure)


def _age_seconds(iso: str, now: datetime.datetime) -> float:
    return (now - datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()


def needs_watch(status: Mapping[str, Any]) -> bool:
    """Running experiments, and finished ones whose results are not in status yet."""
    phase = status.get("phase")
    return phase == "Running" or (phase in cnd.TERMINAL_PHASES and status.get("metrics") is None)


def tracking_credentials(
    kube: KubeLike, namespace: str, exp: RetrievalExperiment, platform: Platform
) -> dict[str, str]:
    """The MLflow credentials the operator may use: only from a Secret that opted in (label) or that the
    platform names, and only towards an allowed tracking host; otherwise none (the request goes anonymous)."""
    tracking = exp.spec.tracking
    if tracking.credentials is None or not platform.tracking_host_allowed(tracking.tracking_uri):
        return {}
    name = tracking.credentials.name
    try:
        labels, data = kube.read_secret_data(namespace, name)
    except PermissionError:  # restricted RBAC: a Secret the platform did not name
        return {}
    return data if labels.get(SECRET_OPT_IN) == "true" or name in platform.allowed_secrets else {}


def watch_progress(
    kube: KubeLike,
    body: Mapping[str, Any],
    now: datetime.datetime,
    client: Callable[..., Mlflow] = Mlflow,
    platform: Platform | None = None,
) -> StatusUpdate:
    """The watchdog: Progressing=False when no metric reached MLflow for deadlines.noProgressSeconds.

    Also fills the MLflow links and, once the job is done, the final metrics and per-language summary.
    """
    status = body.get("status") or {}
    phase = status.get("phase")
    if not needs_watch(status):
        return StatusUpdate()
    platform = platform or Platform()
    try:
        exp = platform.experiment(body)
    except SpecError:
        return StatusUpdate()
    tracking, limit = exp.spec.tracking, exp.spec.deadlines.no_progress_seconds
    if not Mlflow.supports(tracking.tracking_uri):
        if phase != "Running":
            return StatusUpdate(fields=ExperimentStatus(metrics={}))  # nothing to fetch: stop looking
        why = "the MLflow tracking URI is not http(s), so progress cannot be watched"
        return StatusUpdate([Cond(Type.PROGRESSING, "Unknown", Reason.NO_TRACKING_SERVER, why)])
    mlflow = client(
        tracking.tracking_uri, tracking_credentials(kube, body["metadata"]["namespace"], exp, platform)
    )
    report = mlflow.run_progress(exp.mlflow_experiment_name, body["metadata"].get("uid", ""))
    fields = ExperimentStatus()
    conds: list[Cond] = []
    if report is not None:
        links = MlflowStatus(
            experiment_id=report.experiment_id, experiment_url=mlflow.experiment_url(report.experiment_id)
        )
        if report.run_id:
            links.run_id = report.run_id
            links.run_url = mlflow.run_url(report.experiment_id, report.run_id)
        fields.mlflow = links
        if report.last_metric_ms:
            fields.last_metric_time = ms_to_iso(report.last_metric_ms)
        if report.step is not None and exp.spec.sweep is None:
            fields.progress = f"{report.step}/{exp.spec.optimization.max_steps}"
    if phase == "Running" and limit:
        since = fields.last_metric_time or next(
            (c["lastTransitionTime"] for c in status.get("conditions", []) if c.get("type") == Type.RUNNING),
            None,
        )
        age = _age_seconds(since, now) if since else 0.0
        if age > limit:
            why = f"no metric reached MLflow for {int(age)} s"
            conds.append(Cond(Type.PROGRESSING, "False", Reason.NO_PROGRESS, why))
        else:
            why = f"last metric {int(age)} s ago"
            conds.append(Cond(Type.PROGRESSING, "True", Reason.METRICS_ARRIVING, why))
    if phase in cnd.TERMINAL_PHASES:  # the driver has exited, so MLflow has all there will be
        metric = (exp.spec.sweep or SweepSpec()).metric
        fields.metrics = report.metrics if report else {}
        if report and metric in report.metrics:
            fields.best = BestMetric(metric=metric, value=report.metrics[metric])
            fields.languages = language_breakdown(metric, report.metrics)
    return StatusUpdate(conds, fields)


def close_mlflow_run(
    kube: KubeLike, body: Mapping[str, Any], now: datetime.datetime, platform: Platform | None = None
) -> bool:
    """On deletion of an unfinished experiment, mark its MLflow run KILLED (else it stays RUNNING forever)."""
    platform = platform or Platform()
    status = body.get("status") or {}
    run_id = (status.get("mlflow") or {}).get("runId")
    if status.get("phase") in cnd.TERMINAL_PHASES or not run_id:
        return False
    try:
        exp = platform.experiment(body)
    except SpecError:
        return False
    tracking = exp.spec.tracking
    if not Mlflow.supports(tracking.tracking_uri):
        return False
    creds = tracking_credentials(kube, body["metadata"]["namespace"], exp, platform)
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
    conds, _ = cnd.merge_conditions(
        conds, [cnd.ready(conds)], observed, now
    )  # its changes are the others' events
    merged = {**status, **update.fields.model_dump(by_alias=True, exclude_unset=True), "conditions": conds}
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
    written: Callable[[Mapping[str, Any], dict[str, Any]], None] | None = None,
) -> list[Transition]:
    """Read, compute, patch /status with a resourceVersion precondition; retry on conflict.

    ``written(old_body, status_patch)`` is told about each successful write (the operator's metrics)."""
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
        if written is not None:
            written(body, patch)
        return transitions
    raise StatusConflict(f"{namespace}/{name}: status kept changing; will retry")
