{{- define "sft-job.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sft-job.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sft-job.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sft-job.claimName" -}}
{{- default (printf "%s-cache" (include "sft-job.fullname" .)) .Values.cache.existingClaim -}}
{{- end -}}

{{- define "sft-job.nodesService" -}}
{{- printf "%s-nodes" (include "sft-job.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sft-job.judgeUrl" -}}
{{- if .Values.ollama.sidecar -}}
http://localhost:11434
{{- else -}}
{{- required "ollama.externalUrl is required when ollama.sidecar is false" .Values.ollama.externalUrl -}}
{{- end -}}
{{- end -}}
