{{/* The chart name, overridable. */}}
{{- define "petrel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless the release name has it. */}}
{{- define "petrel.fullname" -}}
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

{{/* Labels on every object, together with either the instance label or a selector helper below. */}}
{{- define "petrel.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: petrel
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end }}

{{/* Labels on objects that carry no selector labels. */}}
{{- define "petrel.labels" -}}
{{ include "petrel.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "petrel.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petrel.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the evaluation Redis pod. */}}
{{- define "petrel.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petrel.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "petrel.operator.fullname" -}}
{{- printf "%s-operator" (include "petrel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "petrel.redis.fullname" -}}
{{- printf "%s-redis" (include "petrel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "petrel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petrel.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: digest wins over tag; tag defaults to appVersion. */}}
{{- define "petrel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespace the operator watches in namespaced mode. */}}
{{- define "petrel.watchNamespace" -}}
{{- default .Release.Namespace .Values.rbac.watchNamespace }}
{{- end }}

{{/* The evaluation Redis password: given, else the one already stored, else a new one. */}}
{{- define "petrel.redis.password" -}}
{{- if .Values.redis.password }}
{{- .Values.redis.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "petrel.redis.fullname" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "password") }}
{{- index $existing.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}
