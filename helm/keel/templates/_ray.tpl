{{/*
One Ray pod template for every head and worker group of both Ray resources, so
the restricted Pod Security profile, the config and the credentials are written
once. Call with (dict "ctx" $ "component" "train" "role" "head"|"worker"
"resources" {...} "gpus" 0 "nodeSelector" {...} "tolerations" [...] "serving" bool).
*/}}
{{- define "keel.rayPodTemplate" -}}
{{- $ctx := .ctx -}}
metadata:
  labels:
    {{- include "keel.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  {{- if not ($ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
  annotations:
    prometheus.io/scrape: "true"
    prometheus.io/port: "8080"
  {{- end }}
spec:
  serviceAccountName: {{ include "keel.fullname" $ctx }}-workload
  automountServiceAccountToken: false
  {{- include "keel.imagePullSecrets" (dict "ctx" $ctx "indent" 2) }}
  securityContext:
    {{- include "keel.podSecurityContext" $ctx | nindent 4 }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ if gt (int .gpus) 0 }}{{ include "keel.gpuImage" $ctx | quote }}{{ else }}{{ include "keel.image" $ctx | quote }}{{ end }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      securityContext:
        {{- include "keel.containerSecurityContext" $ctx | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "keel.fullname" $ctx }}-config
      env:
        - name: HOME
          value: /tmp
        {{- include "keel.s3CredentialEnv" $ctx | nindent 8 }}
        {{- include "keel.rayAuthEnv" $ctx | nindent 8 }}
        {{- if and $ctx.Values.mlflow.enabled $ctx.Values.mlflow.auth.enabled }}
        {{- include "keel.secretEnv" (dict "ctx" $ctx "env" "MLFLOW_TRACKING_PASSWORD" "key" $ctx.Values.credentials.mlflowAdminPasswordKey) | nindent 8 }}
        {{- end }}
        {{- if .serving }}
        {{- include "keel.secretEnv" (dict "ctx" $ctx "env" "KEEL_SERVE_TOKEN" "key" $ctx.Values.credentials.serveTokenKey) | nindent 8 }}
        # Ray Serve's HAProxy ingress (keel.serve.config.HAPROXY_ENVIRONMENT)
        - name: RAY_SERVE_ENABLE_HA_PROXY
          value: "1"
        - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
          value: "1"
        {{- end }}
      ports:
        {{- if eq .role "head" }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        {{- if .serving }}
        - name: serve
          containerPort: 8000
        {{- end }}
        - name: metrics
          containerPort: 8080
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
      volumeMounts:
        {{- include "keel.scratchVolumeMounts" $ctx | nindent 8 }}
        - name: shm
          mountPath: /dev/shm
        {{- if $ctx.Values.ray.auth.enabled }}
        {{- include "keel.secretFilesMount" $ctx | nindent 8 }}
        {{- end }}
  volumes:
    {{- if $ctx.Values.ray.auth.enabled }}
    {{- include "keel.secretFilesVolume" (dict "ctx" $ctx "keys" (list $ctx.Values.credentials.rayAuthTokenKey)) | nindent 4 }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 20Gi
    # Ray's object store lives in shared memory.
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: 2Gi
{{- end }}

{{/* The KubeRay autoscaler sidecar follows the same profile. */}}
{{- define "keel.autoscalerOptions" -}}
upscalingMode: Default
idleTimeoutSeconds: 300
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- include "keel.containerSecurityContext" . | nindent 2 }}
resources:
  requests: {cpu: 100m, memory: 256Mi}
  limits: {cpu: 500m, memory: 512Mi}
{{- end }}
