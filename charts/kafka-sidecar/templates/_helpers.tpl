{{/* Names and labels (the usual helm create helpers). */}}

{{- define "kafka-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-sidecar.fullname" -}}
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

{{- define "kafka-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kafka-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kafka-sidecar.labels" -}}
helm.sh/chart: {{ include "kafka-sidecar.chart" . }}
{{ include "kafka-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kafka-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kafka-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" or "repository@digest". Takes (dict "image" IMAGE "tag" DEFAULT_TAG). */}}
{{- define "kafka-sidecar.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (toString (default .tag .image.tag)) }}
{{- end }}
{{- end }}

{{/* PromQL label matchers for this release's sidecar series (prometheusRule.selector). */}}
{{- define "kafka-sidecar.alertSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else if and .Values.deployment.enabled .Values.serviceMonitor.enabled }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (printf "%s-metrics" (include "kafka-sidecar.fullname" .)) }}
{{- else }}
{{- fail "prometheusRule.selector: set it (PromQL label matchers picking this release's sidecars), or enable serviceMonitor so the rules pick what it scrapes" }}
{{- end }}
{{- end }}

{{/* An alert's `for` and labels. Takes (dict "alert" ALERT_VALUES "root" $). */}}
{{- define "kafka-sidecar.alertMeta" -}}
for: {{ .alert.for }}
labels:
  severity: {{ .alert.severity }}
  {{- with omit .root.Values.prometheusRule.alertLabels "severity" }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* A number as PromQL and people write it: 1000000, not 1e+06. */}}
{{- define "kafka-sidecar.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}
