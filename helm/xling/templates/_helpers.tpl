{{/* Names, labels and derived settings shared by the templates. */}}

{{- define "xling.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: "<release>-xling", or the release name if it already contains the chart name. */}}
{{- define "xling.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "xling.operatorName" -}}
{{- printf "%s-operator" (include "xling.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Cluster-scoped RBAC objects carry the namespace too: releases of one name in two namespaces must not clash. */}}
{{- define "xling.clusterRbacName" -}}
{{- printf "%s-%s" (include "xling.operatorName" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xling.mlflowName" -}}
{{- printf "%s-mlflow" (include "xling.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xling.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "xling.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xling
{{- end }}

{{/* Selector labels; "component" is operator, mlflow or test. Call with (dict "ctx" . "component" "..."). */}}
{{- define "xling.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xling.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "xling.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "xling.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "xling.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/* Namespaces the operator watches when not cluster-wide (a list; default: the release namespace). */}}
{{- define "xling.watchNamespaces" -}}
{{- $ns := .Values.operator.watchNamespaces | default (list .Release.Namespace) | uniq }}
{{- toJson $ns }}
{{- end }}

{{/* In-cluster URL of the bundled MLflow server. */}}
{{- define "xling.mlflowUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "xling.mlflowName" .) .Release.Namespace .Values.mlflow.service.port }}
{{- end }}

{{/* Whether the MLflow PersistentVolumeClaim is needed (SQLite file or artifacts on it). */}}
{{- define "xling.mlflowNeedsVolume" -}}
{{- if or (eq .Values.mlflow.backendStore.type "sqlite") (eq .Values.mlflow.artifactStore.type "pvc") }}true{{- end }}
{{- end }}

{{/* Arguments after `python -m xling.operator` (see operator/__main__.py). No --namespace = all namespaces. */}}
{{- define "xling.operatorArgs" -}}
{{- if not .Values.operator.clusterWide }}
{{- range include "xling.watchNamespaces" . | fromJsonArray }}
- --namespace={{ . }}
{{- end }}
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.operator.healthPort }}/healthz
- --log-format={{ .Values.operator.logFormat }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- with .Values.operator.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment of the operator container (variables read by operator/handlers.py). */}}
{{- define "xling.operatorEnv" -}}
{{- $election := .Values.operator.leaderElection }}
{{- if ge $election.renewDeadlineSeconds $election.leaseDurationSeconds }}
{{- fail "operator.leaderElection.renewDeadlineSeconds must be less than leaseDurationSeconds (the leader stops before a standby may take over)" }}
{{- end }}
{{- if ge $election.retryPeriodSeconds $election.renewDeadlineSeconds }}
{{- fail "operator.leaderElection.retryPeriodSeconds must be less than renewDeadlineSeconds" }}
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: XLING_LEASE_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: XLING_LEASE_NAME
  value: {{ include "xling.operatorName" . | quote }}
- name: XLING_LEASE_DURATION
  value: {{ $election.leaseDurationSeconds | quote }}
- name: XLING_LEASE_RENEW_DEADLINE
  value: {{ $election.renewDeadlineSeconds | quote }}
- name: XLING_LEASE_RETRY_PERIOD
  value: {{ $election.retryPeriodSeconds | quote }}
- name: XLING_MAX_WORKERS
  value: {{ .Values.operator.maxWorkers | quote }}
- name: XLING_WATCHDOG_INTERVAL
  value: {{ .Values.operator.watchdogIntervalSeconds | quote }}
- name: XLING_PLATFORM_DEFAULTS
  value: /etc/xling-operator/defaults.yaml
{{- if .Values.metrics.enabled }}
- name: XLING_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- end }}
{{- with .Values.operator.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secrets the operator reads under secrets.restrictRbac: the allowed ones and the platform's storage Secret. */}}
{{- define "xling.readableSecrets" -}}
{{- $names := .Values.secrets.allowed }}
{{- with .Values.trainer.storage.credentialsSecret }}{{- $names = append $names . }}{{- end }}
{{- toJson ($names | uniq) }}
{{- end }}

{{/* Hosts experiments may send metrics (and the operator credentials) to: tracking.allowedHosts, the host of
trainer.trackingUri and the bundled MLflow's. Empty allows none (the operator fails closed). */}}
{{- define "xling.trackingHosts" -}}
{{- $hosts := .Values.tracking.allowedHosts }}
{{- with .Values.trainer.trackingUri }}
{{- $hosts = append $hosts (regexReplaceAll ":[0-9]+$" (urlParse .).host "") }}
{{- end }}
{{- if .Values.mlflow.enabled }}
{{- $hosts = append $hosts (printf "%s.%s.svc" (include "xling.mlflowName" .) .Release.Namespace) }}
{{- end }}
{{- toJson ($hosts | uniq) }}
{{- end }}
