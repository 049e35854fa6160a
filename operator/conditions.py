"""Status of a RetrievalExperiment: a phase plus standard conditions, mirrored from the RayJob.

KubeRay's RayJob has no conditions (kuberay#5152), so ``kubectl wait --for=condition=Succeeded`` only works
on our resource. Everything here is pure: the handlers feed in bodies and get back what to write.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

CONDITION_TYPES = ("Validated", "ClusterReady", "Running", "Succeeded", "Failed", "Suspended", "Progressing")
Phase = Literal["Pending", "Invalid", "Initializing", "Running", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
#: Conditions whose True is bad news: their transitions are posted as Warning events.
_WARNING_WHEN_TRUE = frozenset({"Failed"})
_WARNING_WHEN_FALSE = frozenset({"Validated", "Progressing"})


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
    best: BestMetric | None = None
    metrics: dict[str, float] | None = Field(default=None, description="Final metrics of the run.")
    languages: dict[str, float] | None = Field(
        default=None, description="Per-language value of the best metric, when the job is done."
    )


@dataclass(frozen=True)
class Cond:
    """A wished-for condition; lastTransitionTime and observedGeneration are filled when it is written."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
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
        Cond(t, "Unknown" if t == "Progressing" else "False", "Pending", "waiting for the RayJob")
        for t in CONDITION_TYPES
        if t != "Validated"
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
        new = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message[:32768],
        }
        new["lastTransitionTime"] = now if flipped else old.get("lastTransitionTime", now)
        if generation is not None:
            new["observedGeneration"] = generation
        by_type[cond.type] = new
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(by_type.values(), key=lambda c: order.get(c["type"], len(order))), changed


def condition_status(conditions: Iterable[Mapping[str, Any]], type_: str) -> str | None:
    return next((c.get("status") for c in conditions if c.get("type") == type_), None)


def condition_reason(conditions: Iterable[Mapping[str, Any]], type_: str) -> str | None:
    return next((c.get("reason") for c in conditions if c.get("type") == type_), None)


def phase_of(conditions: Iterable[Mapping[str, Any]], job_deployment_status: str | None) -> Phase:
    """One word for ``kubectl get``; the most final condition wins."""
    conds = list(conditions)

    def true(t: str) -> bool:
        return condition_status(conds, t) == "True"

    for phase in ("Failed", "Succeeded"):
        if true(phase):
            return phase  # type: ignore[return-value]
    if condition_status(conds, "Validated") == "False" and not true("ClusterReady") and not true("Running"):
        return "Invalid"
    if true("Suspended"):
        return "Suspended"
    if true("Running"):
        return "Running"
    if job_deployment_status:
        return "Initializing"
    return "Pending"


def from_rayjob(status: Mapping[str, Any] | None) -> list[Cond]:
    """Map a RayJob's ``status`` (jobDeploymentStatus + jobStatus + reason/message) to our conditions."""
    status = status or {}
    deploy = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or ""
    reason = status.get("reason") or ""
    message = status.get("message") or ""
    cluster = status.get("rayClusterName") or "the Ray cluster"

    def c(t: str, s: bool, r: str, m: str = "") -> Cond:
        return Cond(t, "True" if s else "False", r, m)

    if deploy in ("New", "Initializing", "Waiting", "Retrying"):
        why = {"Retrying": "RayJob is retrying with a new cluster"}.get(deploy, f"{cluster} is starting")
        blocker = cluster_blocker(status.get("rayClusterStatus"))
        return [
            Cond(
                "ClusterReady",
                "True" if deploy == "Waiting" else "False",
                f"Cluster{deploy}",
                "; ".join(m for m in (message, blocker) if m) or why,
                warn=any(word in blocker for word in _TROUBLE_WORDS),
            ),
            c("Running", False, f"Cluster{deploy}", why),
            c("Suspended", False, "NotSuspended"),
        ]
    if deploy == "Running":
        # The job stays Running until KubeRay reports Complete/Failed, also once the Ray job itself ended.
        running = job != "PENDING"
        return [
            c("ClusterReady", True, "ClusterReady", f"{cluster} is ready"),
            c(
                "Running",
                running,
                "JobRunning" if job in ("RUNNING", "") else f"Job{job.capitalize()}",
                message,
            ),
            c("Suspended", False, "NotSuspended"),
        ]
    if deploy in ("Suspending", "Suspended"):
        return [
            c("ClusterReady", False, "Suspended", "the Ray cluster is deleted while suspended"),
            c("Running", False, "Suspended"),
            c("Suspended", deploy == "Suspended", deploy, "spec.suspend is true"),
        ]
    if deploy == "Complete" and job == "SUCCEEDED":
        return [
            c("Running", False, "JobSucceeded"),
            c("Succeeded", True, "JobSucceeded", message or "the Ray job succeeded"),
            c("Failed", False, "JobSucceeded"),
        ]
    if deploy in ("Complete", "Failed", "ValidationFailed"):
        why = reason or (
            "RayJobValidationFailed" if deploy == "ValidationFailed" else f"Job{job.capitalize()}"
        )
        return [
            c("Running", False, why),
            c("Succeeded", False, why),
            c("Failed", True, why, message or f"RayJob ended: {deploy}/{job or 'no job status'}"),
        ]
    return [c("Running", False, "UnknownRayJobState", f"jobDeploymentStatus={deploy!r}")]


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
    return [
        Cond("ClusterReady", "False", "RayJobDeleted", msg),
        Cond("Running", "False", "RayJobDeleted", msg),
        Cond("Failed", "True", "RayJobDeleted", msg),
    ]
