{{/* Names and labels shared by the chart's templates. */}}

{{- define "dicom-node.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dicom-node.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "dicom-node.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "dicom-node.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dicom-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | trunc 63 | trimSuffix "-" }}
{{ include "dicom-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dicom-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dicom-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The data volume's claim: the user's, or the one this chart creates. */}}
{{- define "dicom-node.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "dicom-node.fullname" .)) -}}
{{- end -}}

{{- define "dicom-node.tokenSecretName" -}}
{{- .Values.httpToken.existingSecret | default (printf "%s-http-token" (include "dicom-node.fullname" .)) -}}
{{- end -}}

{{/* The chart's own token: the one already in the cluster on upgrades, else a new one. */}}
{{- define "dicom-node.tokenValue" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "dicom-node.tokenSecretName" .) -}}
{{- if $existing -}}
{{- index $existing.data .Values.httpToken.key -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Cluster mode: the settings must be complete before anything is rendered with them. */}}
{{- define "dicom-node.clusterChecks" -}}
{{- if .Values.cluster.enabled -}}
{{- if .Values.gpuWorker.enabled -}}
{{- fail "cluster.enabled and gpuWorker.enabled exclude each other: in cluster mode inference runs in the worker Deployment (worker.*)" -}}
{{- end -}}
{{- $_ := required "cluster.enabled needs cluster.existingSecret: a Secret with the database and broker URLs" .Values.cluster.existingSecret -}}
{{- $_ := required "cluster.enabled needs config.cluster.objects.url (s3://bucket/prefix)" (dig "cluster" "objects" "url" "" .Values.config) -}}
{{- end -}}
{{- end -}}

{{/* The cluster settings that are secret, from the user's Secret by name (node and workers).
     The S3 key pair is optional there: without it boto3 takes credentials as it does anywhere
     (a pod identity such as IRSA, an instance role). */}}
{{- define "dicom-node.clusterEnv" -}}
{{- $secret := .Values.cluster.existingSecret -}}
{{- $keys := .Values.cluster.secretKeys -}}
- name: DICOM_NODE__CLUSTER__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $keys.databaseUrl }}
- name: DICOM_NODE__CLUSTER__BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $keys.brokerUrl }}
- name: DICOM_NODE__CLUSTER__OBJECTS__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $keys.accessKeyId }}
      optional: true
- name: DICOM_NODE__CLUSTER__OBJECTS__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $keys.secretAccessKey }}
      optional: true
{{- end -}}
