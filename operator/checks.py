"""What a spec needs on a cluster beyond what ``xling run`` checks: refused with ``Validated=False`` before any
pod (and any GPU) is allocated.

:func:`cluster_problems` is pure (``xling render`` runs it too); :func:`preflight` asks the API server about
the objects the spec references. Each problem is ``(reason, "spec.<field>: <why>")``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from xling.api.spec.experiment import RetrievalExperiment
from xling.operator import manifests as mf
from xling.operator.cluster_sizing import pod_count, worker_groups
from xling.operator.conditions import ConditionReason as Reason
from xling.operator.defaults import Platform

Problem = tuple[Reason, str]


class PreflightKube(Protocol):
    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def read_pvc(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def node_resources(self) -> set[str] | None: ...


def cluster_problems(exp: RetrievalExperiment, platform: Platform) -> list[Problem]:
    spec, dist = exp.spec, exp.spec.distributed
    problems: list[Problem] = []
    if plan_only := spec.model.plan_only():
        problems.append((Reason.PLAN_ONLY_MODEL, f"spec.model.name: {plan_only}"))
    if spec.storage is None and pod_count(spec) > 1:
        problems.append(
            (
                Reason.SHARED_STORAGE_REQUIRED,
                f"spec.storage: required: the RayJob has {pod_count(spec)} pods and Ray Train saves "
                "checkpoints from each of them, so they need shared storage (s3://, gs:// or a ReadWriteMany "
                "pvc://); set spec.storage.checkpointUri or ask for a platform default (Helm trainer.storage)",
            )
        )
    if dist.gpus_per_worker > 1:
        problems.append(
            (
                Reason.GPUS_IDLE,
                f"spec.distributed.gpusPerWorker: {dist.gpus_per_worker}: each rank drives one GPU, so the "
                f"others would sit idle; use gpusPerWorker: 1 and numWorkers: "
                f"{dist.num_workers * dist.gpus_per_worker}",
            )
        )
    elif dist.gpus_per_worker and not spec.cluster.worker_groups:
        total, per_node = dist.num_workers, spec.cluster.gpu_node.gpus
        if total > per_node and total % per_node:
            problems.append(
                (
                    Reason.PARTIAL_NODE,
                    f"spec.distributed.numWorkers: {total} GPUs do not fill whole {per_node}-GPU nodes "
                    f"(spec.cluster.gpuNode.gpus); use a multiple of {per_node}",
                )
            )
    version = re.match(r"^(\d+)\.(\d+)", spec.cluster.ray_version)
    if not version or (int(version[1]), int(version[2])) < mf.MIN_RAY_FOR_AUTH:
        problems.append(
            (
                Reason.RAY_TOO_OLD,
                f"spec.cluster.rayVersion: {spec.cluster.ray_version!r}: the Ray job API is protected by a token "
                f"(KubeRay authOptions), which needs Ray {'.'.join(map(str, mf.MIN_RAY_FOR_AUTH))} or later",
            )
        )
    if spec.ttl_seconds_after_finished and (spec.suspend or mf.KUEUE_QUEUE_LABEL in exp.metadata.labels):
        problems.append(
            (Reason.HEAD_KEPT_NOT_SUSPENDABLE, f"spec.ttlSecondsAfterFinished: {mf.NOT_SUSPENDABLE}")
        )
    uri = spec.tracking.tracking_uri
    if not platform.tracking_host_allowed(uri):
        problems.append(
            (
                Reason.TRACKING_HOST_NOT_ALLOWED,
                f"spec.tracking.trackingUri: {uri}: the host is not in the platform's allowedTrackingHosts "
                f"({', '.join(sorted(platform.allowed_tracking_hosts or ())) or 'none: the list is empty'})",
            )
        )
    return problems


def preflight(kube: PreflightKube, exp: RetrievalExperiment, namespace: str) -> list[Problem]:
    """Referenced Secrets exist (and may be read: a 403 is a refusal); a pvc:// claim exists and is ReadWriteMany (pods on many nodes mount it); some
    node offers each GPU resource the pods request (skipped when the operator may not list nodes)."""
    problems: list[Problem] = []
    for name, field in mf.secret_fields(exp.spec).items():
        try:
            if kube.read_secret(namespace, name) is None:
                problems.append(
                    (Reason.SECRET_NOT_FOUND, f"{field}: Secret {name!r} does not exist in {namespace}")
                )
        except PermissionError:  # restricted RBAC (Helm secrets.restrictRbac): refused, not retried forever
            problems.append(
                (
                    Reason.SECRET_NOT_READABLE,
                    f"{field}: the operator may not read Secret {name!r} in {namespace} (403), so it cannot "
                    "check it before allocating pods; add it to the chart's secrets.allowed (restrictRbac "
                    "grants get on those Secrets only)",
                )
            )
    wanted = {g.gpu_resource for g in worker_groups(exp.spec) if g.gpus}
    offered = kube.node_resources() if wanted else None
    if offered is not None and (missing := sorted(wanted - offered)):
        field = (
            "spec.cluster.workerGroups"
            if exp.spec.cluster.worker_groups
            else "spec.distributed.gpusPerWorker"
        )
        problems.append(
            (
                Reason.GPU_RESOURCE_NOT_FOUND,
                f"{field}: no node offers {', '.join(missing)} (is the device plugin installed?)",
            )
        )
    claim = mf.pvc_claim(exp.spec)
    if claim:
        pvc = kube.read_pvc(namespace, claim)
        if pvc is None:
            problems.append(
                (
                    Reason.CLAIM_NOT_FOUND,
                    f"spec.storage.checkpointUri: PersistentVolumeClaim {claim!r} does not exist",
                )
            )
        elif pod_count(exp.spec) > 1 and "ReadWriteMany" not in (pvc.get("spec") or {}).get(
            "accessModes", []
        ):
            modes = ", ".join((pvc.get("spec") or {}).get("accessModes", [])) or "none"
            problems.append(
                (
                    Reason.CLAIM_NOT_SHARED,
                    f"spec.storage.checkpointUri: PersistentVolumeClaim {claim!r} is {modes}, but "
                    f"{pod_count(exp.spec)} pods on different nodes mount it: it must be ReadWriteMany",
                )
            )
    return problems
