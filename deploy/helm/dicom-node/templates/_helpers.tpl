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
