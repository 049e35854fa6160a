"""Pure functions from a validated RetrievalExperiment to the objects the operator creates.

No I/O here: ``xling render`` prints exactly what the operator would create, and the tests validate every
RayJob against KubeRay's own CRD schema.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from xling.operator.crd import GROUP, VERSION
from xling.trainer.spec import (
    API_VERSION,
    KIND,
    ExperimentSpec,
    RetrievalExperiment,
    Toleration,
    WorkerGroupSpec,
    parse_experiment,
)

MANAGED_BY = "xling-operator"
EXPERIMENT_LABEL = f"{GROUP}/experiment"
SPEC_KEY = "experiment.yaml"
SPEC_DIR = "/etc/xling"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
ENTRYPOINT = f"xling run {SPEC_DIR}/{SPEC_KEY}"
RAYJOB_API_VERSION = "ray.io/v1"
#: KubeRay rejects longer RayJob names: it derives cluster, pod and service names from them.
MAX_RAYJOB_NAME = 47
#: What may change after creation; everything else is fixed by the running RayJob.
MUTABLE_SPEC_FIELDS = ("suspend", "deadlines")


@dataclass(frozen=True)
class Owner:
    """The identity of the RetrievalExperiment that owns the children (uid comes from the API server)."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any], default_namespace: str = "default") -> Owner:
        meta = body.get("metadata") or {}
        return cls(meta["name"], meta.get("namespace") or default_namespace, meta.get("uid") or "")


def validate(body: Mapping[str, Any]) -> RetrievalExperiment:
    """The spec as pydantic sees it; raises SpecError whose lines are ``spec.<field path>: <problem>``."""
    meta = body.get("metadata") or {}
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if meta.get(k) is not None},
        "spec": body.get("spec"),
    }
    return parse_experiment(doc, f"{meta.get('namespace')}/{meta.get('name')}")


def rayjob_name(experiment: str) -> str:
    """Deterministic, so creating twice is a 409 and never a duplicate."""
    if len(experiment) <= MAX_RAYJOB_NAME:
        return experiment
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:6]
    return f"{experiment[: MAX_RAYJOB_NAME - 7].rstrip('-')}-{digest}"


def configmap_name(experiment: str) -> str:
    return f"{experiment}-spec"


def labels(owner: Owner, user_labels: dict[str, str] | None = None) -> dict[str, str]:
    """User labels (e.g. Kueue's queue-name) pass through; ours win on conflict."""
    return {
        **(user_labels or {}),
        "app.kubernetes.io/name": "xling",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        EXPERIMENT_LABEL: owner.name,
    }


def _metadata(name: str, owner: Owner, user_labels: dict[str, str]) -> dict[str, Any]:
    ref = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, user_labels),
        "ownerReferences": [ref],
    }


def output_dir(exp: RetrievalExperiment) -> str:
    """Where checkpoints go on the cluster: under the storage URI, one folder per experiment."""
    storage = exp.spec.storage
    if storage is None:
        return exp.spec.output_dir
    uri = storage.checkpoint_uri
    if uri.startswith("pvc://"):
        _, _, sub = uri.removeprefix("pvc://").partition("/")
        return "/".join(p for p in (CHECKPOINT_MOUNT, sub.strip("/"), exp.metadata.name) if p)
    return f"{uri.rstrip('/')}/{exp.metadata.name}"


def resolved_document(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    """The spec with every default filled in: what the trainer reads and what later updates are compared with."""
    spec = exp.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    spec["outputDir"] = output_dir(exp)
    meta: dict[str, Any] = {"name": owner.name, "namespace": owner.namespace}
    if exp.metadata.labels:
        meta["labels"] = dict(exp.metadata.labels)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def configmap(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    text = yaml.safe_dump(resolved_document(exp, owner), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(configmap_name(owner.name), owner, exp.metadata.labels),
        "data": {SPEC_KEY: text},
    }


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def worker_groups(spec: ExperimentSpec) -> list[WorkerGroupSpec]:
    """The declared groups, or one sized from spec.distributed."""
    if spec.cluster.worker_groups:
        return spec.cluster.worker_groups
    dist = spec.distributed
    return [
        WorkerGroupSpec(
            name="workers",
            replicas=dist.num_workers,
            gpus=dist.gpus_per_worker,
            cpu=_cpu(dist.cpus_per_worker),
        )
    ]


def _tolerations(items: list[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in items]


def _env(exp: RetrievalExperiment, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    env = [
        {"name": "XLING_EXPERIMENT", "value": owner.name},
        {"name": "XLING_NAMESPACE", "value": owner.namespace},
        {"name": "XLING_EXPERIMENT_UID", "value": owner.uid},
    ]
    tracking = exp.spec.tracking
    if tracking.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking.tracking_uri})
    secrets = [s for s in (tracking.credentials, exp.spec.storage and exp.spec.storage.credentials) if s]
    env_from = [{"secretRef": {"name": name}} for name in dict.fromkeys(s.name for s in secrets)]
    return env, env_from


def _pod_template(
    exp: RetrievalExperiment,
    owner: Owner,
    container: str,
    resources: dict[str, Any],
    node_selector: dict[str, str],
    tolerations: list[Toleration],
    shm: tuple[bool, str | None],
) -> dict[str, Any]:
    """One pod template for head and workers, so both see the same spec, env and storage."""
    cluster = exp.spec.cluster
    env, env_from = _env(exp, owner)
    mounts = [{"name": "experiment", "mountPath": SPEC_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "experiment", "configMap": {"name": configmap_name(owner.name)}}
    ]
    storage = exp.spec.storage
    if storage is not None and storage.checkpoint_uri.startswith("pvc://"):
        claim = storage.checkpoint_uri.removeprefix("pvc://").split("/", 1)[0]
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
    with_shm, shm_limit = shm
    if with_shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        empty_dir: dict[str, Any] = {"medium": "Memory"}
        if shm_limit:
            empty_dir["sizeLimit"] = shm_limit
        volumes.append({"name": "dshm", "emptyDir": empty_dir})
    box: dict[str, Any] = {
        "name": container,
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
    }
    if env_from:
        box["envFrom"] = env_from
    pod: dict[str, Any] = {"containers": [box], "volumes": volumes}
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = _tolerations(tolerations)
    if cluster.service_account_name:
        pod["serviceAccountName"] = cluster.service_account_name
    return {"metadata": {"labels": labels(owner)}, "spec": pod}


def ray_cluster_spec(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    cluster = exp.spec.cluster
    head = cluster.head
    head_res = {"cpu": head.cpu, "memory": head.memory}
    groups = []
    for g in worker_groups(exp.spec):
        limits: dict[str, Any] = {"cpu": g.cpu, "memory": g.memory}
        if g.gpus:
            limits[g.gpu_resource] = g.gpus
        template = _pod_template(
            exp,
            owner,
            "ray-worker",
            {"requests": {"cpu": g.cpu, "memory": g.memory}, "limits": limits},
            g.node_selector,
            g.tolerations,
            (True, g.shared_memory),
        )
        groups.append(
            {
                "groupName": g.name,
                "replicas": g.replicas,
                "minReplicas": g.replicas,
                "maxReplicas": g.replicas,
                "rayStartParams": {},
                "template": template,
            }
        )
    head_template = _pod_template(
        exp,
        owner,
        "ray-head",
        {"requests": head_res, "limits": head_res},
        head.node_selector,
        head.tolerations,
        (False, None),
    )
    return {
        "rayVersion": cluster.ray_version,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": head_template,
        },
        "workerGroupSpecs": groups,
    }


def mutable_rayjob_fields(spec: ExperimentSpec) -> dict[str, Any]:
    """The RayJob fields that follow spec.suspend and spec.deadlines; None removes a deadline."""
    return {
        "suspend": spec.suspend,
        "activeDeadlineSeconds": spec.deadlines.total_seconds,
        "preRunningDeadlineSeconds": spec.deadlines.to_running_seconds,
    }


def rayjob(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    """KubeRay RayJob: K8sJobMode submission, no KubeRay retries (Ray Train resumes from checkpoints)."""
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": exp.spec.ttl_seconds_after_finished,
        "backoffLimit": 0,
        **{k: v for k, v in mutable_rayjob_fields(exp.spec).items() if v is not None},
        "rayClusterSpec": ray_cluster_spec(exp, owner),
    }
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(rayjob_name(owner.name), owner, exp.metadata.labels),
        "spec": spec,
    }


def immutable_changes(running: Any, wanted: Any, path: str = "spec") -> list[str]:
    """Field paths where two resolved specs differ, outside MUTABLE_SPEC_FIELDS."""
    if path == "spec":
        running = {k: v for k, v in running.items() if k not in MUTABLE_SPEC_FIELDS}
        wanted = {k: v for k, v in wanted.items() if k not in MUTABLE_SPEC_FIELDS}
    if isinstance(running, dict) and isinstance(wanted, dict):
        return [
            p
            for key in sorted(set(running) | set(wanted))
            for p in immutable_changes(running.get(key), wanted.get(key), f"{path}.{key}")
        ]
    return [] if running == wanted else [path]
