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

{{/* "true" when the pod runs the Ollama sidecar: asked for, and a judge to serve (config.skip_judge
needs none). */}}
{{- define "sft-job.sidecar" -}}
{{- if and .Values.ollama.sidecar (not .Values.config.skip_judge) }}true{{ end -}}
{{- end -}}

{{- define "sft-job.judgeUrl" -}}
{{- if include "sft-job.sidecar" . -}}
http://localhost:11434
{{- else -}}
{{- required "ollama.externalUrl is required when ollama.sidecar is false (or set config.skip_judge=true)" .Values.ollama.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The job container's environment (the Job's pods and the TrainJob's nodes alike). */}}
{{- define "sft-job.env" -}}
- name: HOME                   # caches (matplotlib, torch.compile) go to the writable /tmp
  value: /tmp
{{- if not .Values.config.skip_judge }}
- name: OLLAMA_HOST
  value: {{ include "sft-job.judgeUrl" . | quote }}
{{- end }}
- name: SFT_JOB_CACHE
  value: /cache
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- if .Values.judge.existingSecret }}
- name: SFT_JOB_JUDGE_API_KEY_FILE
  value: /var/run/secrets/sft-job/judge/{{ .Values.judge.apiKeyKey }}
{{- end }}
{{- end -}}

{{/* The job container's mounts. */}}
{{- define "sft-job.volumeMounts" -}}
- name: config
  mountPath: /etc/sft-job
  readOnly: true
- name: cache
  mountPath: /cache
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if .Values.judge.existingSecret }}
- name: judge-secret
  mountPath: /var/run/secrets/sft-job/judge
  readOnly: true
{{- end }}
{{- end -}}

{{/* The pod's volumes for the job container (not the Ollama sidecar's). */}}
{{- define "sft-job.volumes" -}}
- name: config
  configMap:
    name: {{ include "sft-job.fullname" . }}
- name: cache
  {{- if or (eq (int .Values.nodes) 1) .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ include "sft-job.claimName" . }}
  {{- else }}
  # several nodes: a volume of its own for each pod (a shared claim needs ReadWriteMany: cache.existingClaim)
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: [ReadWriteOnce]
        resources:
          requests:
            storage: {{ .Values.cache.size }}
        {{- with .Values.cache.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
  {{- end }}
- name: shm
  emptyDir:
    medium: Memory
- name: tmp
  emptyDir: {}
{{- if .Values.judge.existingSecret }}
- name: judge-secret
  secret:
    secretName: {{ .Values.judge.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- end -}}
