{{/* Chart name. */}}
{{- define "uniguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, truncated to 63 characters (DNS label). */}}
{{- define "uniguard.fullname" -}}
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

{{- define "uniguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "uniguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uniguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/* Labels shared by every object (no component). */}}
{{- define "uniguard.commonLabels" -}}
helm.sh/chart: {{ include "uniguard.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: uniguard
{{- end }}

{{- define "uniguard.labels" -}}
{{ include "uniguard.commonLabels" . }}
{{ include "uniguard.selectorLabels" . }}
{{- end }}

{{- define "uniguard.redis.labels" -}}
{{ include "uniguard.commonLabels" . }}
{{ include "uniguard.redis.selectorLabels" . }}
{{- end }}

{{- define "uniguard.redis.fullname" -}}
{{- printf "%s-redis" (include "uniguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "uniguard.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uniguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "uniguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "uniguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image: the CUDA tag when gpu.enabled. */}}
{{- define "uniguard.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.gpu.enabled }}
{{- $tag = .Values.image.cudaTag | default (printf "%s-cuda" .Chart.AppVersion) }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "uniguard.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "uniguard.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{- define "uniguard.hasPolicies" -}}
{{- if or .Values.policies.existingConfigMap .Values.policies.files }}true{{- end }}
{{- end }}

{{- define "uniguard.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "uniguard.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* Fail rendering when the grace period does not cover preStop + the batcher's drain + a margin. */}}
{{- define "uniguard.checkGracePeriod" -}}
{{- $needed := add (int .Values.preStopSleepSeconds) (int (ceil .Values.config.requestTimeoutS)) (int .Values.shutdownMarginSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.requestTimeoutS + shutdownMarginSeconds (%d): raise it or lower the request timeout" (int .Values.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}

{{/* An env value as a string; whole numbers stay digits (YAML numbers arrive as float64: 1e+07 -> 10000000). */}}
{{- define "uniguard.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}
