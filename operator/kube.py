"""The few Kubernetes API calls the operator makes, behind one small synchronous client.

kopf watches and patches its own resource; every other call goes through here, so ``rbac.CLIENT_CALLS`` and
``rbac.LEADER_ELECTION_CALLS`` can be read off this file. Sync on purpose: kopf runs sync handlers in its thread pool, and the official client is
sync. Each method is one request; 404 reads come back as None, 409 creates as :class:`Conflict`, 403s as
PermissionError.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from xling.operator.crd import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
RAYJOB = ("ray.io", "v1", "rayjobs")
EXPERIMENT = (GROUP, VERSION, PLURAL)


class Conflict(Exception):
    """409: the object exists already (create) or changed since it was read (patch with resourceVersion)."""


class NotInstalled(Exception):
    """404 on a create: the API (e.g. KubeRay's ray.io/v1 RayJob) is not served by this cluster."""


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)

    @classmethod
    def from_environment(cls, pool_size: int = 32) -> Kube:
        """In-cluster service account, else $KUBECONFIG / ~/.kube/config (as kopf's own login does)."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            # $KUBECONFIG is read now: the client's own default was frozen when it was imported.
            kubernetes.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), client_configuration=config
            )
        config.connection_pool_maxsize = pool_size  # one connection per handler thread
        return cls(kubernetes.client.ApiClient(config))

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own watches and patches (the token is re-read on each login)."""
        c = self.api_client.configuration
        header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization") or ""
        scheme, _, token = header.rpartition(" ")
        return kopf.ConnectionInfo(
            server=c.host,
            ca_path=c.ssl_ca_cert,
            insecure=not c.verify_ssl,
            scheme=scheme or ("Bearer" if token else None),
            token=token or None,
            certificate_path=c.cert_file,
            private_key_path=c.key_file,
        )

    def close(self) -> None:
        self.api_client.close()

    @staticmethod
    def _json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        try:
            resp = call(*args, _preload_content=False, **kwargs)
        except ApiException as err:
            if err.status == 404:
                return None
            if err.status == 409:
                raise Conflict(err.reason) from None
            if err.status == 403:  # RBAC: the caller decides (a refusal, a skipped check), never a retry loop
                raise PermissionError(f"403 Forbidden: {err.reason}") from None
            raise
        return json.loads(resp.data or b"null")

    # --- ConfigMaps (v1) ---
    def create_configmap(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return self._json(self.core.create_namespaced_config_map, body["metadata"]["namespace"], body)

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._json(self.core.read_namespaced_config_map, name, namespace)

    def patch_configmap(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._json(
            self.core.patch_namespaced_config_map, name, namespace, patch, _content_type=MERGE_PATCH
        )

    # --- Secrets (v1): existence for the preflight; data only of the MLflow credentials a spec names ---
    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret's metadata only (its data is dropped at once), or None."""
        secret = self._json(self.core.read_namespaced_secret, name, namespace)
        return None if secret is None else {"metadata": secret.get("metadata") or {}}

    def read_secret_data(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """(labels, decoded data); the caller decides whether the Secret opted in before using the data."""
        secret = self._json(self.core.read_namespaced_secret, name, namespace) or {}
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return (secret.get("metadata") or {}).get("labels") or {}, data

    # --- Nodes (v1): the preflight checks that some node offers the GPUs' resource name ---
    def node_resources(self) -> set[str] | None:
        """Every resource name some node can allocate (e.g. nvidia.com/gpu); None when not allowed to list."""
        try:
            nodes = self._json(self.core.list_node) or {}
        except PermissionError:
            return None
        return {
            r for n in nodes.get("items") or [] for r in ((n.get("status") or {}).get("allocatable") or {})
        }

    # --- PersistentVolumeClaims (v1): the preflight checks a pvc:// claim's access modes ---
    def read_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._json(self.core.read_namespaced_persistent_volume_claim, name, namespace)

    # --- Pods (v1): why the pods of a starting experiment do not start (an image that cannot be pulled) ---
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self._json(self.core.list_namespaced_pod, namespace, label_selector=selector) or {}
        return pods.get("items") or []

    # --- RayJobs (ray.io/v1) ---
    def create_rayjob(self, body: dict[str, Any]) -> dict[str, Any]:
        """Raises NotInstalled when the cluster serves no RayJob API (a 404 on create means that)."""
        created = self._json(
            self.custom.create_namespaced_custom_object,
            *RAYJOB[:2],
            body["metadata"]["namespace"],
            RAYJOB[2],
            body,
        )
        if created is None:
            raise NotInstalled("the ray.io/v1 RayJob API is not served: is KubeRay installed?")
        return created

    def read_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._json(
            self.custom.get_namespaced_custom_object, RAYJOB[0], RAYJOB[1], namespace, RAYJOB[2], name
        )

    def patch_rayjob(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._json(
            self.custom.patch_namespaced_custom_object,
            *RAYJOB[:2],
            namespace,
            RAYJOB[2],
            name,
            patch,
            _content_type=MERGE_PATCH,
        )

    # --- RetrievalExperiments: read, and write status (kopf itself does list/watch/patch) ---
    def read_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._json(
            self.custom.get_namespaced_custom_object, *EXPERIMENT[:2], namespace, EXPERIMENT[2], name
        )

    def patch_experiment_status(
        self, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge patch of /status; put metadata.resourceVersion in ``patch`` for optimistic concurrency."""
        return self._json(
            self.custom.patch_namespaced_custom_object_status,
            *EXPERIMENT[:2],
            namespace,
            EXPERIMENT[2],
            name,
            patch,
            _content_type=MERGE_PATCH,
        )

    # --- Leases (coordination.k8s.io/v1): leader election, in the operator's own namespace ---
    def read_lease(self, namespace: str, name: str, timeout: float) -> dict[str, Any] | None:
        return self._json(self.coordination.read_namespaced_lease, name, namespace, _request_timeout=timeout)

    def create_lease(self, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        return self._json(
            self.coordination.create_namespaced_lease,
            body["metadata"]["namespace"],
            body,
            _request_timeout=timeout,
        )

    def replace_lease(self, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """PUT with the body's metadata.resourceVersion: Conflict when another candidate wrote it since."""
        meta = body["metadata"]
        return self._json(
            self.coordination.replace_namespaced_lease,
            meta["name"],
            meta["namespace"],
            body,
            _request_timeout=timeout,
        )
