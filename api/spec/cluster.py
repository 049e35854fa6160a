"""The cluster side of the spec: what a Kubernetes cluster needs to run it.

Read only by :mod:`xling.operator` (``xling run`` ignores these fields): the Ray cluster's image and pods,
checkpoint storage shared by the pods, and the deadlines the operator enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from xling.api.spec.base import K8sName, PositiveInt, SecretRef, Spec

#: Image used when spec.cluster.image is unset; the Helm chart builds and pushes it under this name.
DEFAULT_IMAGE = "xling:0.1.0"
#: Must match the Ray inside the image (KubeRay starts the cluster with it).
DEFAULT_RAY_VERSION = "2.60.0"

Quantity = Annotated[
    str,
    Field(
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$",
        description="Kubernetes quantity: 500m, 8, 16Gi.",
    ),
]


class Toleration(Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None


class HeadSpec(Spec):
    """The Ray head pod: runs the driver (``xling run``) and the dashboard, never training (no GPUs, no CPUs
    advertised to Ray, so no rank lands on it)."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    shared_memory: Quantity = Field(
        default="2Gi", description="Size limit of the head's memory-backed /dev/shm."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class GpuNodeSpec(Spec):
    """How the derived worker group packs GPU ranks into pods: one pod per node, one rank per GPU, so NCCL
    uses NVLink between the ranks of a node."""

    gpus: PositiveInt = Field(
        default=8, description="GPUs per pod (per node); fewer when the run needs fewer."
    )
    cpu_per_gpu: Annotated[float, Field(gt=0.0)] = Field(default=8.0, description="CPU cores per GPU.")
    memory_per_gpu_gi: PositiveInt = Field(default=64, description="Memory per GPU, in GiB.")


class SecretKeyRef(Spec):
    name: K8sName
    key: Annotated[str, Field(min_length=1, max_length=253)]


class EnvVar(Spec):
    """An environment variable for every Ray pod: a value, or one key of a Secret in the namespace."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=253)]
    value: str | None = None
    secret_key_ref: SecretKeyRef | None = Field(default=None, description="Read the value from a Secret key.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.secret_key_ref is None):
            raise ValueError(f"env {self.name}: set exactly one of value, secretKeyRef")
        return self


class RolePod(Spec):
    """Scheduling and identity of Ray pods: in ``cluster.pod`` for every pod, in ``cluster.pod.head``,
    ``.workers`` or ``.submitter`` for one role only (lists add up, maps merge, the role's single values win).

    The objects are Kubernetes' own (validated by the API server when KubeRay creates the pods)."""

    tolerations: list[Toleration] = Field(default_factory=list, description="E.g. for tainted GPU nodes.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = Field(default=None, description="Affinity (node, pod, anti-affinity).")
    service_account_name: K8sName | None = None
    automount_service_account_token: bool | None = Field(
        default=None,
        description="Mount the ServiceAccount's API token. Default: false (Ray needs no Kubernetes API).",
    )
    image_pull_secrets: list[K8sName] = Field(default_factory=list)
    security_context: dict[str, Any] | None = Field(
        default=None, description="PodSecurityContext. Default: the restricted Pod Security Standard."
    )
    container_security_context: dict[str, Any] | None = Field(
        default=None,
        description="SecurityContext of the container. Default: restricted (drop ALL, no escalation).",
    )


class PodOverrides(RolePod):
    """Pod-template settings for every Ray pod (head, workers, submitter), merged over the platform's defaults,
    plus per-role settings on top. Modelled on Kubeflow Trainer's pod overrides."""

    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra volumes (Kubernetes Volume objects) of head and workers."
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra mounts in the Ray container of head and workers."
    )
    head: RolePod = Field(default_factory=RolePod, description="Only the head pod.")
    workers: RolePod = Field(
        default_factory=RolePod, description="Only the worker pods (e.g. GPU tolerations)."
    )
    submitter: RolePod = Field(
        default_factory=RolePod, description="Only the pod that submits the Ray job (KubeRay's K8sJobMode)."
    )

    def role(self, name: Literal["head", "workers", "submitter"]) -> RolePod:
        """The settings one role's pods get: these shared ones with the role's on top."""
        own: RolePod = getattr(self, name)

        def pick(field: str) -> Any:
            mine = getattr(own, field)
            return getattr(self, field) if mine is None else mine

        return RolePod(
            tolerations=self.tolerations + own.tolerations,
            node_selector={**self.node_selector, **own.node_selector},
            image_pull_secrets=list(dict.fromkeys([*self.image_pull_secrets, *own.image_pull_secrets])),
            **{
                f: pick(f)
                for f in RolePod.model_fields
                if f not in ("tolerations", "node_selector", "image_pull_secrets")
            },
        )


class WorkerGroupSpec(Spec):
    """One KubeRay worker group of identical pods (fixed size: gang semantics for ZeRO-3)."""

    name: K8sName
    replicas: PositiveInt = 1
    gpus: Annotated[int, Field(ge=0)] = Field(default=0, description="GPUs per pod (the gpuResource limit).")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name of the GPUs.")
    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    shared_memory: Quantity | None = Field(
        default=None,
        description="Size limit of /dev/shm (memory-backed; NCCL needs it large). Unset = no limit.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class ClusterSpec(Spec):
    """The Ray cluster KubeRay creates for this experiment (and deletes when it finishes)."""

    image: str | None = Field(
        default=None,
        description=f"Image with xling, Ray and the trainer's dependencies. Default: the platform's (Helm "
        f"trainer.image), else {DEFAULT_IMAGE!r} (a local build).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = DEFAULT_RAY_VERSION
    service_account_name: K8sName | None = None
    head: HeadSpec = Field(default_factory=HeadSpec)
    worker_groups: list[WorkerGroupSpec] = Field(
        default_factory=list,
        description="Empty: one group derived from spec.distributed: GPU runs get pods of gpuNode.gpus GPUs "
        "(one rank per GPU), CPU runs one pod per rank; sweeps get room for maxConcurrentTrials trials.",
    )
    gpu_node: GpuNodeSpec = Field(default_factory=GpuNodeSpec)
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of every Ray pod.")
    env_from: list[SecretRef] = Field(
        default_factory=list, description="Secrets whose keys become environment variables (e.g. HF_TOKEN)."
    )
    pod: PodOverrides = Field(default_factory=PodOverrides)


class StorageSpec(Spec):
    checkpoint_uri: str = Field(
        pattern=r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|(s3|gs)://[^/]+(/.*)?)$",
        description="Shared by every pod: pvc://CLAIM[/PATH] (a ReadWriteMany claim mounted on every pod), "
        "s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]. Becomes outputDir.",
    )
    credentials: SecretRef | None = Field(
        default=None,
        description="For s3://: a Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_ENDPOINT_URL), "
        "passed as environment. For gs://: a Secret whose key `key.json` is a service-account key, mounted as "
        "a file that GOOGLE_APPLICATION_CREDENTIALS names. Unset = the pods' ambient identity.",
    )


class DeadlinesSpec(Spec):
    """May change while the experiment runs (as may spec.suspend)."""

    total_seconds: PositiveInt | None = Field(
        default=None, description="Whole run, from start (RayJob activeDeadlineSeconds)."
    )
    to_running_seconds: PositiveInt | None = Field(
        default=3600,
        description="From start until the job runs (RayJob preRunningDeadlineSeconds): an image that cannot be "
        "pulled or pods that cannot be scheduled fail the experiment instead of waiting forever. null = off.",
    )
    no_progress_seconds: PositiveInt | None = Field(
        default=1800,
        description="Watchdog: Progressing=False when no metric arrived for this long. null = off.",
    )
