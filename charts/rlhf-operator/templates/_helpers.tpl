{{/*
Names. The full name is the release name when it already contains the chart name, otherwise
"<release>-<chart>"; cluster-scoped objects (ClusterRoles, bindings) carry it, so two releases in
different namespaces need different release names.
*/}}
{{- define "rlhf-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf-operator.fullname" -}}
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

{{- define "rlhf-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "rlhf-operator.labels" -}}
helm.sh/chart: {{ include "rlhf-operator.chart" . }}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlhf-operator.leaseName" -}}
{{- default (include "rlhf-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "rlhf-operator.imageRef" -}}
{{- $tag := default .appVersion .image.tag }}
{{- $ref := printf "%s:%s" .image.repository $tag }}
{{- if .image.digest }}
{{- $ref = printf "%s@%s" $ref .image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
The namespaces whose RLHFRuns this release acts on: empty means every namespace (ClusterRole and
ClusterRoleBinding), a list means a Role and RoleBinding in each (and nothing elsewhere).
*/}}
{{- define "rlhf-operator.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Fail early on settings that cannot work together. */}}
{{- define "rlhf-operator.validate" -}}
{{- $kube := .Capabilities.KubeVersion.Version }}
{{- if and (not (hasPrefix "v0.0.0" $kube)) (semverCompare "<1.29.0-0" $kube) }}
{{- fail (printf "Kubernetes %s is too old: rlhf-operator needs 1.29 or newer" $kube) }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: two replicas without a Lease would both act on every run" }}
{{- end }}
{{- if ne (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)) }}
{{- fail "watchNamespaces lists a namespace twice" }}
{{- end }}
{{- end }}

{{- /*
What the operator does in a namespace it watches, and nothing more (docs/install.md):
read and watch runs, write their status; create the stage Jobs (and suspend, resume and delete
them); read Pods for stage results (termination messages), never create them; create each
stage's ConfigMap and the workspace PVC; post Events. No Secrets: stage pods reference them by
name, which needs no right of the operator's.
*/}}
{{- define "rlhf-operator.namespacedRules" -}}
- apiGroups: [rlhf-operator.io]
  resources: [rlhfruns]
  verbs: [get, list, watch]
- apiGroups: [rlhf-operator.io]
  resources: [rlhfruns/status]
  verbs: [get, update, patch]
# Owner references with blockOwnerDeletion need update on the owner's finalizers (where the
# OwnerReferencesPermissionEnforcement admission plugin is on, e.g. OpenShift).
- apiGroups: [rlhf-operator.io]
  resources: [rlhfruns/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Live progress: the tail of a running stage's log, where the stage prints its progress lines
# (docs/operator.md "Live progress"); read-only, no exec or attach.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# A multi-node stage's rendezvous Service, created once before its Job (AlreadyExists is success);
# owned by the run, so the garbage collector, not the operator, deletes it.
- apiGroups: [""]
  resources: [services]
  verbs: [create]
# Watched: the operator's cache knows whether each run's workspace exists; created when missing.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* The operator's ServiceAccount, as RBAC subjects. */}}
{{- define "rlhf-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "rlhf-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/*
The API's built-in stage image (rlhf_operator.api.runtime.DEFAULT_STAGE_IMAGE): the CRD fills it in
when a run names none, and the operator replaces it with stageDefaults.image. tests/chart/test_policy.py
keeps the two equal.
*/}}
{{- define "rlhf-operator.apiDefaultStageImage" -}}
ghcr.io/rlhf-operator/rlhf-stages:0.1.0
{{- end }}
