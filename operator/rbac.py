"""Every Kubernetes API call the operator makes, as (verb, API group, resource[/subresource]).

Read off the code (kopf's own watching/patching, :mod:`xling.operator.kube`, kopf's event poster) and checked
against recorded runs against the emulator (tests/operator/test_integration.py, test_election.py). The Helm chart generates its
least-privilege Role/ClusterRole from these constants, so nothing here may be broader than what is used.
"""

from __future__ import annotations

from xling.operator.crd import GROUP, PLURAL

ApiCall = tuple[str, str, str]

#: kopf: discovering and watching the resources it serves; progress annotations (and removing the finalizer
#: of an older release).
KOPF_CALLS: frozenset[ApiCall] = frozenset(
    {
        ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
        ("list", GROUP, PLURAL),
        ("watch", GROUP, PLURAL),
        ("patch", GROUP, PLURAL),
        ("list", "ray.io", "rayjobs"),  # @kopf.on.event mirror of RayJob status
        ("watch", "ray.io", "rayjobs"),
        ("create", "", "events"),  # kopf.event(): one per status transition
    }
)

#: xling.operator.kube.Kube, method by method.
CLIENT_CALLS: frozenset[ApiCall] = frozenset(
    {
        ("create", "", "configmaps"),
        ("get", "", "configmaps"),
        ("patch", "", "configmaps"),
        (
            "get",
            "",
            "secrets",
        ),  # preflight: referenced Secrets exist; data only of opted-in MLflow credentials
        ("get", "", "persistentvolumeclaims"),  # preflight: a pvc:// claim exists and is ReadWriteMany
        ("list", "", "pods"),  # watchdog: image pulls that fail while the Ray cluster starts
        ("list", "", "nodes"),  # preflight of GPU runs: some node offers the GPU resource (cluster-scoped)
        ("create", "ray.io", "rayjobs"),
        ("get", "ray.io", "rayjobs"),
        ("patch", "ray.io", "rayjobs"),
        ("get", GROUP, PLURAL),
        ("patch", GROUP, f"{PLURAL}/status"),
    }
)

#: Everything the operator calls when it watches all namespaces (the default).
API_CALLS: frozenset[ApiCall] = KOPF_CALLS | CLIENT_CALLS

#: Leader election (:mod:`xling.operator.election`): the Lease in the operator's own namespace, granted there
#: only (a Role of its own), whatever namespaces it watches.
LEADER_ELECTION_CALLS: frozenset[ApiCall] = frozenset(
    {
        ("get", "coordination.k8s.io", "leases"),
        ("create", "coordination.k8s.io", "leases"),
        ("update", "coordination.k8s.io", "leases"),
    }
)

#: Added when it watches a list of namespaces (``--namespace``): kopf then follows namespaces.
NAMESPACED_MODE_CALLS: frozenset[ApiCall] = frozenset(
    {("list", "", "namespaces"), ("watch", "", "namespaces")}
)

#: Permissions needed without a request of that name: creating children with ``blockOwnerDeletion: true``
#: requires ``update`` on the owner's finalizers under the OwnerReferencesPermissionEnforcement admission plugin.
IMPLIED_PERMISSIONS: frozenset[ApiCall] = frozenset({("update", GROUP, f"{PLURAL}/finalizers")})


def rules(calls: frozenset[ApiCall] = API_CALLS | IMPLIED_PERMISSIONS) -> list[dict[str, list[str]]]:
    """RBAC PolicyRules (one per group and resource, verbs sorted), for the Helm chart."""
    grouped: dict[tuple[str, str], set[str]] = {}
    for verb, group, resource in calls:
        grouped.setdefault((group, resource), set()).add(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        for (group, resource), verbs in sorted(grouped.items())
    ]
