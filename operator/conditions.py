"""Status of a RetrievalExperiment: a phase plus standard conditions, mirrored from the RayJob.

KubeRay's RayJob has no conditions (kuberay#5152), so ``kubectl wait --for=condition=Succeeded`` only works
on our resource. Everything here is pure: the handlers feed in bodies and get back what to write.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ConditionType(StrEnum):
    """Every ``status.conditions[].type`` the operator writes, in the order they are listed in status.

    The values are the API (``kubectl wait --for=condition=...``); docs/operator.md lists each one.
    """

    READY = "Ready"  # the summary (:func:`ready`): True once succeeded, else why not, in its reason
    VALIDATED = "Validated"
    CLUSTER_READY = "ClusterReady"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    PROGRESSING = "Progressing"


class ConditionReason(StrEnum):
    """Every ``status.conditions[].reason`` the operator chooses (also the reason of its transition events).

    The only other reasons in status are KubeRay's own, copied verbatim onto a failed job's conditions by
    :func:`from_rayjob`. The values are the API; docs/operator.md lists each one with its meaning.
    """

    # Any condition, before anything is known.
    PENDING = "Pending"
    # Validated: the spec, then the cluster checks and preflight (xling.operator.checks).
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    SHARED_STORAGE_REQUIRED = "SharedStorageRequired"
    PLAN_ONLY_MODEL = "PlanOnlyModel"
    GPUS_IDLE = "GpusIdle"
    PARTIAL_NODE = "PartialNode"
    TRACKING_HOST_NOT_ALLOWED = "TrackingHostNotAllowed"
    RAY_TOO_OLD = "RayTooOld"
    HEAD_KEPT_NOT_SUSPENDABLE = "HeadKeptNotSuspendable"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_NOT_READABLE = "SecretNotReadable"
    GPU_RESOURCE_NOT_FOUND = "GpuResourceNotFound"
    CLAIM_NOT_FOUND = "ClaimNotFound"
    CLAIM_NOT_SHARED = "ClaimNotShared"
    # ClusterReady / Running while the Ray cluster comes up: one per KubeRay jobDeploymentStatus.
    KUBERAY_NOT_INSTALLED = "KubeRayNotInstalled"
    CLUSTER_NEW = "ClusterNew"
    CLUSTER_INITIALIZING = "ClusterInitializing"
    CLUSTER_WAITING = "ClusterWaiting"
    CLUSTER_RETRYING = "ClusterRetrying"
    CLUSTER_READY = "ClusterReady"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    # Running / Succeeded / Failed: one per KubeRay jobStatus.
    JOB_NEW = "Job"  # KubeRay's JobStatusNew is the empty string, hence the bare word
    JOB_SUBMITTING = "JobSubmitting"  # the cluster is up, the submitter has not submitted the Ray job yet
    JOB_PENDING = "JobPending"
    JOB_RUNNING = "JobRunning"
    JOB_STOPPED = "JobStopped"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    RAYJOB_VALIDATION_FAILED = "RayJobValidationFailed"
    RAYJOB_DELETED = "RayJobDeleted"
    UNKNOWN_RAYJOB_STATE = "UnknownRayJobState"
    # Suspended (and ClusterReady / Running while suspended).
    NOT_SUSPENDED = "NotSuspended"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    # Progressing: the no-progress watchdog.
    METRICS_ARRIVING = "MetricsArriving"
    NO_PROGRESS = "NoProgress"
    NO_TRACKING_SERVER = "NoTrackingServer"


Phase = Literal["Pending", "Invalid", "Initializing", "Running", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
#: Conditions whose True is bad news: their transitions are posted as Warning events.
_WARNING_WHEN_TRUE = frozenset({ConditionType.FAILED})
_WARNING_WHEN_FALSE = frozenset({ConditionType.VALIDATED, ConditionType.PROGRESSING})
#: KubeRay's jobDeploymentStatus while the cluster comes up, and the reason each one is reported with.
_STARTING_REASONS = {
    "New": ConditionReason.CLUSTER_NEW,
    "Initializing": ConditionReason.CLUSTER_INITIALIZING,
    "Waiting": ConditionReason.CLUSTER_WAITING,
    "Retrying": ConditionReason.CLUSTER_RETRYING,
}
#: KubeRay's jobStatus values (its JobStatusNew is "") and the reason each one is reported with.
_JOB_REASONS = {
    "": ConditionReason.JOB_NEW,
    "PENDING": ConditionReason.JOB_PENDING,
    "RUNNING": ConditionReason.JOB_RUNNING,
    "STOPPED": ConditionReason.JOB_STOPPED,
    "SUCCEEDED": ConditionReason.JOB_SUCCEEDED,
    "FAILED": ConditionReason.JOB_FAILED,
}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Model):
    """A metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class MlflowStatus(_Model):
    experiment_id: str | None = None
    run_id: str | None = None
    experiment_url: str | None = None
    run_url: str | None = None


class BestMetric(_Model):
    metric: str
    value: float


class ExperimentStatus(_Model):
    """Written by the operator only. Unknown fields are kept (not pruned) for forward compatibility."""

    model_config = ConfigDict(extra="allow")

    phase: Phase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    ray_job_name: str | None = None
    config_map_name: str | None = None
    dashboard_url: str | None = None
    job_deployment_status: str | None = Field(default=None, description="Mirrored from the RayJob.")
    job_status: str | None = Field(default=None, description="Mirrored from the RayJob.")
    mlflow: MlflowStatus | None = None
    last_metric_time: str | None = Field(default=None, description="When the newest metric reached MLflow.")
    progress: str | None = Field(
        default=None, description="Training step of maxSteps (STEP/MAX), from MLflow."
    )
    best: BestMetric | None = None
    metrics: dict[str, float] | None = Field(default=None, description="Final metrics of the run.")
    languages: dict[str, float] | None = Field(
        default=None, description="Per-language value of the best metric, when the job is done."
    )


@dataclass(frozen=True)
class Cond:
    """A wished-for condition; lastTransitionTime and observedGeneration are filled when it is written."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    #: One of ours, or KubeRay's own reason for a failed job, copied verbatim (:func:`from_rayjob`).
    reason: ConditionReason | str
    message: str = ""
    #: Bad news whatever the type: posted as a Warning event, also when only the reason changes.
    warn: bool = False

    @property
    def warning(self) -> bool:
        return (
            self.warn
            or (self.status == "True" and self.type in _WARNING_WHEN_TRUE)
            or (self.status == "False" and self.type in _WARNING_WHEN_FALSE)
        )


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def initial_conditions() -> list[Cond]:
    """Every type starts present, so ``kubectl wait`` never sees a missing condition."""
    return [
        Cond(
            t,
            "Unknown" if t == ConditionType.PROGRESSING else "False",
            ConditionReason.PENDING,
            "waiting for the RayJob",
        )
        for t in ConditionType
        if t != ConditionType.VALIDATED
    ]


def merge_conditions(
    existing: Iterable[Mapping[str, Any]], updates: Iterable[Cond], generation: int | None, now: str
) -> tuple[list[dict[str, Any]], list[Cond]]:
    """Apply ``updates`` to a conditions list; return the new list and the conditions whose status changed.

    lastTransitionTime moves only when the status flips; reason/message/observedGeneration follow the update.
    """
    by_type = {c["type"]: dict(c) for c in existing if "type" in c}
    changed: list[Cond] = []
    for cond in updates:
        old = by_type.get(cond.type)
        flipped = old is None or old.get("status") != cond.status
        if flipped or (cond.warn and old.get("reason") != cond.reason):
            changed.append(cond)
        by_type[cond.type] = Condition(
            type=cond.type,
            status=cond.status,
            reason=cond.reason,
            message=cond.message[:32768],
            last_transition_time=now if flipped else old.get("lastTransitionTime", now),
            observed_generation=generation,
        ).model_dump(by_alias=True, exclude_none=True)
    order = {t: i for i, t in enumerate(ConditionType)}
    return sorted(by_type.values(), key=lambda c: order.get(c["type"], len(order))), changed


#: Where Ready=False takes its reason and message from: the first of these conditions in that state.
_NOT_READY_BECAUSE = (
    (ConditionType.FAILED, "True"),
    (ConditionType.VALIDATED, "False"),
    (ConditionType.SUSPENDED, "True"),
    (ConditionType.PROGRESSING, "False"),
    (ConditionType.RUNNING, "True"),
    (ConditionType.CLUSTER_READY, "False"),
    (ConditionType.CLUSTER_READY, "True"),
)


def ready(conditions: Iterable[Mapping[str, Any]]) -> Cond:
    """The summary condition, for ``kubectl get`` (the Reason column) and ``kubectl wait --for=condition=Ready``:
    True once the experiment succeeded; otherwise False with the reason and message of the condition that
    says why not (failed, refused, suspended, stalled, running, starting)."""
    by_type = {c.get("type"): c for c in conditions}
    done = by_type.get(ConditionType.SUCCEEDED) or {}
    if done.get("status") == "True":
        return Cond(ConditionType.READY, "True", done["reason"], done.get("message", ""))
    for type_, status in _NOT_READY_BECAUSE:
        if (c := by_type.get(type_)) and c.get("status") == status:
            return Cond(ConditionType.READY, "False", c["reason"], c.get("message", ""))
    return Cond(ConditionType.READY, "False", ConditionReason.PENDING, "waiting for the RayJob")


def condition_status(conditions: Iterable[Mapping[str, Any]], type_: ConditionType) -> str | None:
    return next((c.get("status") for c in conditions if c.get("type") == type_), None)


def condition_reason(conditions: Iterable[Mapping[str, Any]], type_: ConditionType) -> str | None:
    return next((c.get("reason") for c in conditions if c.get("type") == type_), None)


def phase_of(conditions: Iterable[Mapping[str, Any]], job_deployment_status: str | None) -> Phase:
    """One word for ``kubectl get``; the most final condition wins."""
    conds = list(conditions)

    def true(t: ConditionType) -> bool:
        return condition_status(conds, t) == "True"

    if true(ConditionType.FAILED):
        return "Failed"
    if true(ConditionType.SUCCEEDED):
        return "Succeeded"
    if (
        condition_status(conds, ConditionType.VALIDATED) == "False"
        and not true(ConditionType.CLUSTER_READY)
        and not true(ConditionType.RUNNING)
    ):
        return "Invalid"
    if true(ConditionType.SUSPENDED):
        return "Suspended"
    if true(ConditionType.RUNNING):
        return "Running"
    if job_deployment_status:
        return "Initializing"
    return "Pending"


#: Container waiting reasons that mean the image will not come by itself (the kubelet only backs off).
_PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})


def image_pull_failure(pods: Iterable[Mapping[str, Any]]) -> str:
    """Which pods cannot pull their image, with the kubelet's reason and message; empty when none."""
    found = []
    for pod in pods:
        status = pod.get("status") or {}
        for box in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (box.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _PULL_FAILURES:
                why = f" ({waiting['message']})" if waiting.get("message") else ""
                found.append(
                    f"pod {pod['metadata']['name']}, container {box.get('name')}: {waiting['reason']}{why}"
                )
    return "; ".join(found)


def from_rayjob(status: Mapping[str, Any] | None, pull_failure: str = "") -> list[Cond]:
    """Map a RayJob's ``status`` (jobDeploymentStatus + jobStatus + reason/message) to our conditions;
    ``pull_failure`` (:func:`image_pull_failure` of its pods) says why a starting one cannot start."""
    status = status or {}
    deploy = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or ""
    reason = status.get("reason") or ""
    message = status.get("message") or ""
    cluster = status.get("rayClusterName") or "the Ray cluster"

    def c(t: ConditionType, s: bool, r: ConditionReason | str, m: str = "") -> Cond:
        return Cond(t, "True" if s else "False", r, m)

    T, R = ConditionType, ConditionReason
    submitting = deploy == "Running" and job == ""  # the cluster is up; the submitter's pod may not be
    if pull_failure and (deploy in _STARTING_REASONS or submitting):
        # the pods wait for an image that will not come: say so now, not at the pre-running deadline
        ready = (
            c(T.CLUSTER_READY, True, R.CLUSTER_READY, f"{cluster} is ready")
            if submitting
            else Cond(T.CLUSTER_READY, "False", R.IMAGE_PULL_FAILED, pull_failure, warn=True)
        )
        return [
            ready,
            Cond(T.RUNNING, "False", R.IMAGE_PULL_FAILED, pull_failure, warn=True),
            c(T.SUSPENDED, False, R.NOT_SUSPENDED),
        ]
    if starting := _STARTING_REASONS.get(deploy):
        why = {"Retrying": "RayJob is retrying with a new cluster"}.get(deploy, f"{cluster} is starting")
        blocker = cluster_blocker(status.get("rayClusterStatus"))
        return [
            Cond(
                T.CLUSTER_READY,
                "True" if deploy == "Waiting" else "False",
                starting,
                "; ".join(m for m in (message, blocker) if m) or why,
                warn=any(word in blocker for word in _TROUBLE_WORDS),
            ),
            c(T.RUNNING, False, starting, why),
            c(T.SUSPENDED, False, R.NOT_SUSPENDED),
        ]
    if deploy == "Running":
        # The job stays Running until KubeRay reports Complete/Failed, also once the Ray job itself ended.
        # KubeRay says Running as soon as it created the submitter; no jobStatus yet means nothing was
        # submitted (the submitter pod may be refused by Pod Security, or unable to pull its image).
        if job == "":
            why = message or (
                "the Ray cluster is ready, the job is not submitted yet; if this lasts, `kubectl describe job "
                "<rayJobName>` shows why the submitter pod does not run (Pod Security, image pull)"
            )
            return [
                c(T.CLUSTER_READY, True, R.CLUSTER_READY, f"{cluster} is ready"),
                c(T.RUNNING, False, R.JOB_SUBMITTING, why),
                c(T.SUSPENDED, False, R.NOT_SUSPENDED),
            ]
        return [
            c(T.CLUSTER_READY, True, R.CLUSTER_READY, f"{cluster} is ready"),
            c(T.RUNNING, job != "PENDING", _JOB_REASONS.get(job, R.UNKNOWN_RAYJOB_STATE), message),
            c(T.SUSPENDED, False, R.NOT_SUSPENDED),
        ]
    if deploy in ("Suspending", "Suspended"):
        return [
            c(T.CLUSTER_READY, False, R.SUSPENDED, "the Ray cluster is deleted while suspended"),
            c(T.RUNNING, False, R.SUSPENDED),
            c(
                T.SUSPENDED,
                deploy == "Suspended",
                R.SUSPENDED if deploy == "Suspended" else R.SUSPENDING,
                "spec.suspend is true",
            ),
        ]
    if deploy == "Complete" and job == "SUCCEEDED":
        return [
            c(T.RUNNING, False, R.JOB_SUCCEEDED),
            c(T.SUCCEEDED, True, R.JOB_SUCCEEDED, message or "the Ray job succeeded"),
            c(T.FAILED, False, R.JOB_SUCCEEDED),
        ]
    if deploy in ("Complete", "Failed", "ValidationFailed"):
        why = reason or (
            R.RAYJOB_VALIDATION_FAILED
            if deploy == "ValidationFailed"
            else _JOB_REASONS.get(job, R.UNKNOWN_RAYJOB_STATE)
        )
        return [
            c(T.RUNNING, False, why),
            c(T.SUCCEEDED, False, why),
            c(T.FAILED, True, why, message or f"RayJob ended: {deploy}/{job or 'no job status'}"),
        ]
    return [c(T.RUNNING, False, R.UNKNOWN_RAYJOB_STATE, f"jobDeploymentStatus={deploy!r}")]


#: Words in a RayCluster reason that mean the wait will not end by itself (posted as a Warning).
_TROUBLE_WORDS = (
    "ReplicaFailure",
    "Unschedulable",
    "ImagePull",
    "ErrImage",
    "CrashLoop",
    "quota",
    "Forbidden",
)
#: RayCluster conditions that explain a wait, and the status that means trouble.
_CLUSTER_TROUBLE = {"HeadPodReady": "False", "RayClusterProvisioned": "False", "ReplicaFailure": "True"}


def cluster_blocker(cluster_status: Mapping[str, Any] | None) -> str:
    """Why the Ray cluster is not up yet (image pull, unschedulable, quota), from the RayCluster status KubeRay
    copies into the RayJob; empty when nothing is wrong or nothing is known yet."""
    cluster_status = cluster_status or {}
    found = [
        f"{c.get('type')}: {c.get('reason') or c.get('status')}"
        + (f" ({c['message']})" if c.get("message") else "")
        for c in cluster_status.get("conditions") or []
        if _CLUSTER_TROUBLE.get(c.get("type") or "") == c.get("status")
        and (c.get("reason") or c.get("message"))
    ]
    if cluster_status.get("reason"):
        found.append(f"RayCluster: {cluster_status['reason']}")
    return "; ".join(found)


def rayjob_deleted() -> list[Cond]:
    """A RayJob deleted by hand is reported, not recreated: rerunning a 30B training must be deliberate."""
    msg = "the RayJob was deleted outside the operator; delete and re-apply the experiment to run it again"
    deleted = ConditionReason.RAYJOB_DELETED
    return [
        Cond(ConditionType.CLUSTER_READY, "False", deleted, msg),
        Cond(ConditionType.RUNNING, "False", deleted, msg),
        Cond(ConditionType.FAILED, "True", deleted, msg),
    ]
