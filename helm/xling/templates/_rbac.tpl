{{/*
The operator's permissions: exactly the API calls it makes (operator/rbac.py lists them; tests/deploy/test_helm.py
checks that these rules and that list agree). No wildcards.
*/}}

{{/* Rules on namespaced resources, granted in every watched namespace (Role) or everywhere (ClusterRole). */}}
{{- define "xling.rbac.namespacedRules" -}}
# RetrievalExperiments: kopf lists, watches and patches them (progress annotations; an old release's finalizer).
- apiGroups: [xling.io]
  resources: [retrievalexperiments]
  verbs: [get, list, watch, patch]
# Conditions, phase and results.
- apiGroups: [xling.io]
  resources: [retrievalexperiments/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which needs update on the owner's finalizers.
- apiGroups: [xling.io]
  resources: [retrievalexperiments/finalizers]
  verbs: [update]
# One RayJob per experiment: created, read back, suspended/resumed by patch; kopf watches their status.
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [get, list, watch, create, patch]
# The experiment spec handed to the Ray job as a mounted file.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Preflight: the Secrets an experiment references exist; data is used only from opted-in Secrets (label
# xling.io/operator-readable=true or secrets.allowed). restrictRbac: only the named ones (secrets.allowed and
# trainer.storage.credentialsSecret); any other Secret a spec names is refused as SecretNotReadable.
{{- $names := include "xling.readableSecrets" . | fromJsonArray }}
{{- if or (not .Values.secrets.restrictRbac) $names }}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- if .Values.secrets.restrictRbac }}
  resourceNames: {{ toJson $names }}
  {{- end }}
{{- end }}
# Preflight: a pvc:// checkpoint claim exists and is ReadWriteMany.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# Watchdog: the pods of a starting experiment, for image pulls that fail (reported at once, not at a deadline).
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# kopf reports handler progress and errors as Events on the experiment.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Rules on cluster-scoped resources (always a ClusterRole): kopf's discovery. */}}
{{- define "xling.rbac.clusterRules" -}}
# CRDs: kopf notices resources (such as KubeRay's RayJob) appearing after it started.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
# Preflight of GPU runs: some node offers the requested GPU resource (e.g. nvidia.com/gpu).
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
{{- if not .Values.operator.clusterWide }}
# Namespaces: with a list of namespaces to watch, kopf follows which of them exist.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}

{{/* Leader election (operator/election.py): the release's Lease, in the operator's own namespace only. */}}
{{- define "xling.rbac.leaderElectionRules" -}}
# One Lease per release: read, created by the first replica, updated to renew or take over.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create, get, update]
{{- end }}
