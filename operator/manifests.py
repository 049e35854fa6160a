"""Pure functions from a validated RetrievalExperiment to the objects the operator creates.

No I/O here: ``xling render`` prints exactly what the operator would create, and the tests validate every
RayJob against KubeRay's own CRD schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from xling.api.env import EXPERIMENT_ENV, EXPERIMENT_UID_ENV, NAMESPACE_ENV
from xling.api.spec.base import API_VERSION, KIND
from xling.api.spec.cluster import DEFAULT_IMAGE, RolePod, Toleration, WorkerGroupSpec
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.loading import parse_experiment
from xling.operator.cluster_sizing import worker_groups
from xling.operator.crd import GROUP, MUTABLE_SPEC_FIELDS, VERSION

MANAGED_BY = "xling-operator"
EXPERIMENT_LABEL = f"{GROUP}/experiment"
SPEC_KEY = "experiment.yaml"
SPEC_DIR = "/etc/xling"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
ENTRYPOINT = f"xling run {SPEC_DIR}/{SPEC_KEY}"
RAYJOB_API_VERSION = "ray.io/v1"
#: KubeRay rejects longer RayJob names: it derives cluster, pod and service names from them.
MAX_RAYJOB_NAME = 47
#: On the RayJob: the mutable fields as last applied, so a field is patched only when the user changed it
#: (Kueue suspends and resumes RayJobs itself; re-applying spec.suspend on every reconcile would fight it).
APPLIED_ANNOTATION = f"{GROUP}/applied"
#: On the ConfigMap: the spec as the user wrote it, to tell their edits from defaults a new release adds.
USER_SPEC_ANNOTATION = f"{GROUP}/user-spec"
#: Pod and container security that passes the ``restricted`` Pod Security Standard (ray images run as 1000).
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
#: KubeRay's token authentication of the dashboard and job API needs this Ray version or later.
MIN_RAY_FOR_AUTH = (2, 52)
#: Kueue's queue label: Kueue then suspends the RayJob until its quota is free.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Why an experiment that keeps its head after the job cannot be suspended (refused at creation and on edit).
NOT_SUSPENDABLE = (
    "keeping the head after the job (> 0) uses KubeRay's deletion rules, and KubeRay refuses a suspended RayJob "
    "with them (spec.suspend, or Kueue's queue label: Kueue suspends the RayJobs it queues); set it to 0"
)
#: KubeRay's own default for its submitter pod (``ray job submit`` and ``ray job logs --follow``).
SUBMITTER_RESOURCES = {"cpu": "1", "memory": "1Gi"}
#: A gs:// store's service-account key: the Secret's key, and where it is mounted in every Ray pod.
GCS_KEY = "key.json"
GCS_KEY_DIR = "/var/run/secrets/xling/gcs"


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


def configmap(
    exp: RetrievalExperiment, owner: Owner, user_spec: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    text = yaml.safe_dump(resolved_document(exp, owner), sort_keys=False)
    meta = _metadata(configmap_name(owner.name), owner, exp.metadata.labels)
    if user_spec is not None:
        meta["annotations"] = {USER_SPEC_ANNOTATION: json.dumps(user_spec, sort_keys=True)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {SPEC_KEY: text}}


def _unique(items: list[Toleration]) -> list[Toleration]:
    return [t for i, t in enumerate(items) if t not in items[:i]]


def _tolerations(items: list[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in items]


def gcs_key_secret(spec: ExperimentSpec) -> str | None:
    """The Secret holding a gs:// store's service-account key: mounted as a file, never put in the environment
    (Google's libraries read GOOGLE_APPLICATION_CREDENTIALS as a path)."""
    storage = spec.storage
    if storage is None or storage.credentials is None or not storage.checkpoint_uri.startswith("gs://"):
        return None
    return storage.credentials.name


def _env(exp: RetrievalExperiment, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    env = [
        {"name": EXPERIMENT_ENV, "value": owner.name},
        {"name": NAMESPACE_ENV, "value": owner.namespace},
        {"name": EXPERIMENT_UID_ENV, "value": owner.uid},
    ]
    tracking, cluster = exp.spec.tracking, exp.spec.cluster
    if tracking.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking.tracking_uri})
    if gcs_key_secret(exp.spec):
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_DIR}/{GCS_KEY}"})
    for var in cluster.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
        else:
            env.append({"name": var.name, "value": var.value})
    storage = exp.spec.storage
    as_env = storage and not gcs_key_secret(exp.spec) and storage.credentials
    secrets = [s for s in (tracking.credentials, as_env) if s]
    names = [s.name for s in secrets + list(cluster.env_from)]
    env_from = [{"secretRef": {"name": name}} for name in dict.fromkeys(names)]
    return env, env_from


def secret_fields(spec: ExperimentSpec) -> dict[str, str]:
    """Every Secret the pods reference, for the preflight: name -> the first spec field that names it."""
    refs = [
        ("spec.tracking.credentials", spec.tracking.credentials),
        ("spec.storage.credentials", spec.storage and spec.storage.credentials),
        *((f"spec.cluster.envFrom[{i}]", r) for i, r in enumerate(spec.cluster.env_from)),
        *((f"spec.cluster.env[{i}].secretKeyRef", v.secret_key_ref) for i, v in enumerate(spec.cluster.env)),
    ]
    out: dict[str, str] = {}
    for field, ref in refs:
        if ref:
            out.setdefault(ref.name, field)
    return out


def pvc_claim(spec: ExperimentSpec) -> str | None:
    storage = spec.storage
    if storage is None or not storage.checkpoint_uri.startswith("pvc://"):
        return None
    return storage.checkpoint_uri.removeprefix("pvc://").split("/", 1)[0]


def _pod_spec(
    exp: RetrievalExperiment,
    role: RolePod,
    boxes: list[dict[str, Any]],
    node_selector: dict[str, str],
    tolerations: list[Toleration],
) -> dict[str, Any]:
    """Scheduling, identity and security of one role's pods: the role's settings (``cluster.pod`` merged
    with ``cluster.pod.<role>``) plus the group's own node selector and tolerations."""
    cluster, over = exp.spec.cluster, exp.spec.cluster.pod
    pod: dict[str, Any] = {
        "containers": boxes,
        "securityContext": role.security_context or RESTRICTED_POD,
        # Ray needs no Kubernetes API: a mounted token would only serve whoever gets code into the pod.
        "automountServiceAccountToken": bool(role.automount_service_account_token),
    }
    for box in boxes:
        box["securityContext"] = role.container_security_context or RESTRICTED_CONTAINER
    if selector := {**role.node_selector, **node_selector}:
        pod["nodeSelector"] = selector
    if every := _unique(role.tolerations + tolerations):
        pod["tolerations"] = _tolerations(every)
    if account := role.service_account_name or cluster.service_account_name:
        pod["serviceAccountName"] = account
    if role.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in role.image_pull_secrets]
    if over.priority_class_name:
        pod["priorityClassName"] = over.priority_class_name
    if role.affinity:
        pod["affinity"] = role.affinity
    return pod


def _metadata_of_pods(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    over = exp.spec.cluster.pod
    meta: dict[str, Any] = {"labels": {**over.labels, **labels(owner)}}
    if over.annotations:
        meta["annotations"] = dict(over.annotations)
    return meta


def _pod_template(
    exp: RetrievalExperiment,
    owner: Owner,
    container: str,
    resources: dict[str, Any],
    role: RolePod,
    node_selector: dict[str, str],
    tolerations: list[Toleration],
    shm_limit: str | None,
) -> dict[str, Any]:
    """One pod template for head and workers, so both see the same spec, env, storage and overrides."""
    cluster, over = exp.spec.cluster, exp.spec.cluster.pod
    env, env_from = _env(exp, owner)
    mounts = [{"name": "experiment", "mountPath": SPEC_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "experiment", "configMap": {"name": configmap_name(owner.name)}}
    ]
    if claim := pvc_claim(exp.spec):
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
    if key := gcs_key_secret(exp.spec):
        mounts.append({"name": "gcs-key", "mountPath": GCS_KEY_DIR, "readOnly": True})
        items = [{"key": GCS_KEY, "path": GCS_KEY}]
        volumes.append({"name": "gcs-key", "secret": {"secretName": key, "items": items}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # NCCL and Ray's object store need a big one
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if shm_limit:
        empty_dir["sizeLimit"] = shm_limit
    volumes.append({"name": "dshm", "emptyDir": empty_dir})
    box: dict[str, Any] = {
        "name": container,
        "image": cluster.image or DEFAULT_IMAGE,
        "imagePullPolicy": cluster.image_pull_policy,
        "env": env,
        "resources": resources,
        "volumeMounts": mounts + list(over.volume_mounts),
    }
    if env_from:
        box["envFrom"] = env_from
    pod = _pod_spec(exp, role, [box], node_selector, tolerations)
    pod["volumes"] = volumes + list(over.volumes)
    if over.topology_spread_constraints:
        pod["topologySpreadConstraints"] = list(over.topology_spread_constraints)
    return {"metadata": _metadata_of_pods(exp, owner), "spec": pod}


def submitter_template(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    """The pod that runs ``ray job submit`` (KubeRay fills in its command, address and auth token): the trainer
    image, restricted security, and the submitter's scheduling, pull secrets and service account, so it runs
    where Ray pods run (KubeRay's default has none of these: a restricted namespace rejects it)."""
    cluster = exp.spec.cluster
    box = {
        "name": "ray-job-submitter",
        "image": cluster.image or DEFAULT_IMAGE,
        "imagePullPolicy": cluster.image_pull_policy,
        "resources": {"requests": SUBMITTER_RESOURCES, "limits": SUBMITTER_RESOURCES},
    }
    pod = _pod_spec(exp, cluster.pod.role("submitter"), [box], {}, [])
    pod["restartPolicy"] = "Never"
    return {"metadata": _metadata_of_pods(exp, owner), "spec": pod}


def gpu_toleration(group: WorkerGroupSpec) -> list[Toleration]:
    """GPU nodes are commonly tainted with their resource name; a GPU pod tolerates that taint."""
    if not group.gpus:
        return []
    return [Toleration(key=group.gpu_resource, operator="Exists", effect="NoSchedule")]


def ray_cluster_spec(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    cluster = exp.spec.cluster
    head = cluster.head
    head_res = {"cpu": head.cpu, "memory": head.memory}
    workers = cluster.pod.role("workers")
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
            workers,
            g.node_selector,
            g.tolerations + gpu_toleration(g),
            g.shared_memory,
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
        cluster.pod.role("head"),
        head.node_selector,
        head.tolerations,
        head.shared_memory,
    )
    return {
        "rayVersion": cluster.ray_version,
        # The dashboard and job API run code with the experiment's credentials: a token (a Secret KubeRay
        # creates; it hands it to the Ray pods and the submitter) is required for every request.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # No Ray CPUs or GPUs on the head: ranks and trial drivers must land on worker pods.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0"},
            "template": head_template,
        },
        "workerGroupSpecs": groups,
    }


def cleanup(spec: ExperimentSpec) -> dict[str, Any]:
    """When the finished cluster goes: all of it at once (default), or the GPU workers at once and the head
    ``ttlSecondsAfterFinished`` later, for its logs (KubeRay's deletionRules, which exclude
    shutdownAfterJobFinishes)."""
    keep = spec.ttl_seconds_after_finished
    if not keep:
        return {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 0}
    ends = [{"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}]
    stages = (("DeleteWorkers", 0), ("DeleteCluster", keep))
    rules = [{"policy": p, "condition": {**end, "ttlSeconds": t}} for end in ends for p, t in stages]
    return {"shutdownAfterJobFinishes": False, "deletionStrategy": {"deletionRules": rules}}


def mutable_rayjob_fields(spec: ExperimentSpec) -> dict[str, Any]:
    """The RayJob fields that follow spec.suspend and spec.deadlines; None removes a deadline."""
    return {
        "suspend": spec.suspend,
        "activeDeadlineSeconds": spec.deadlines.total_seconds,
        "preRunningDeadlineSeconds": spec.deadlines.to_running_seconds,
    }


def rayjob(exp: RetrievalExperiment, owner: Owner) -> dict[str, Any]:
    """KubeRay RayJob: K8sJobMode submission, no KubeRay retries (Ray Train resumes from checkpoints)."""
    mutable = mutable_rayjob_fields(exp.spec)
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        **cleanup(exp.spec),
        "backoffLimit": 0,
        **{k: v for k, v in mutable.items() if v is not None},
        "rayClusterSpec": ray_cluster_spec(exp, owner),
        "submitterPodTemplate": submitter_template(exp, owner),
    }
    meta = _metadata(rayjob_name(owner.name), owner, exp.metadata.labels)
    meta["annotations"] = {APPLIED_ANNOTATION: json.dumps(mutable, sort_keys=True)}
    return {"apiVersion": RAYJOB_API_VERSION, "kind": "RayJob", "metadata": meta, "spec": spec}


def mutable_patch(current: Mapping[str, Any], spec: ExperimentSpec) -> dict[str, Any] | None:
    """The RayJob patch for the mutable fields the user changed since they were last applied, or None.

    Compared with the last-applied annotation, not with the RayJob's spec: others (Kueue) may set suspend.
    """
    annotations = (current.get("metadata") or {}).get("annotations") or {}
    try:
        applied = json.loads(annotations.get(APPLIED_ANNOTATION) or "null")
    except ValueError:
        applied = None
    wanted = mutable_rayjob_fields(spec)
    if not isinstance(applied, dict):  # made by an older operator: adopt what it has, change nothing
        applied = {k: (current.get("spec") or {}).get(k) for k in wanted}
    changed = {k: v for k, v in wanted.items() if applied.get(k) != v}
    if not changed:
        return None
    note = json.dumps({**applied, **changed}, sort_keys=True)
    return {"metadata": {"annotations": {APPLIED_ANNOTATION: note}}, "spec": changed}


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
