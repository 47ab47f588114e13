{{/* Names */}}
{{- define "keel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "keel.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "keel.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels: keel.labels takes (dict "ctx" $ "component" "mlflow") */}}
{{- define "keel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keel.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "keel.labels" -}}
{{ include "keel.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: keel
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Object metadata: name, namespace, labels. (dict "ctx" $ "component" "x" "name" "suffix" "namespace" "ns");
the namespace defaults to the release's. */}}
{{- define "keel.metadata" -}}
name: {{ include "keel.fullname" .ctx }}-{{ .name | default .component }}
namespace: {{ .namespace | default .ctx.Release.Namespace }}
labels:
  {{- include "keel.labels" . | nindent 2 }}
{{- end }}

{{/* Images */}}
{{- define "keel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "keel.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.image.gpuTag) }}
{{- end }}

{{/* A third-party image: (dict "image" .Values.minio.image) */}}
{{- define "keel.thirdPartyImage" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}
{{- end }}

{{/*
checkov skips, each with its reason beside the resource. (dict "digest" "<digest or empty>" "skips" (list "CKV_K8S_35=reason"))
An image without a digest is tag-pinned: say so instead of hiding it.
*/}}
{{- define "keel.checkovSkips" -}}
{{- $skips := .skips | default list }}
{{- if not .digest }}
{{- $skips = append $skips "CKV_K8S_43=Pinned by version tag; set the image digest value to pin by digest in production" }}
{{- end }}
{{- range $i, $skip := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $skip | quote }}
{{- end }}
{{- end }}

{{/* Credentials as files (mount of the credentials Secret): (dict "ctx" $ "keys" (list ...)); "optional" true
starts the pod without the Secret, for a check that names what is missing. */}}
{{- define "keel.secretFilesVolume" -}}
- name: credentials
  secret:
    secretName: {{ .ctx.Values.credentials.existingSecret }}
    defaultMode: 0440
    {{- if .optional }}
    optional: true
    {{- end }}
    items:
      {{- range .keys }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}

{{- define "keel.secretFilesMount" -}}
- name: credentials
  mountPath: /var/run/secrets/keel
  readOnly: true
{{- end }}

{{/* The restricted Pod Security profile */}}
{{- define "keel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "keel.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Endpoints every component reads (the keel-config ConfigMap) */}}
{{- define "keel.mlflowUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s-mlflow.%s.svc.cluster.local:%d" (include "keel.fullname" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{- define "keel.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s-minio.%s.svc.cluster.local:9000" (include "keel.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.minio.externalEndpoint }}
{{- end }}
{{- end }}

{{/* An ingress rule letting the namespaces Prometheus scrapes from reach a pod's metrics ports: (dict "ctx" $
"ports" (list ...)); nothing when either list is empty. */}}
{{- define "keel.metricsIngress" -}}
{{- if and .ports .ctx.Values.networkPolicy.metricsNamespaces }}
# Prometheus, scraping metrics.
- from:
    - namespaceSelector:
        matchExpressions:
          - key: kubernetes.io/metadata.name
            operator: In
            values: {{ toJson .ctx.Values.networkPolicy.metricsNamespaces }}
  ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end }}

{{/* host:port steps push to (what prometheus_client's push_to_gateway takes): config.pushgatewayUrl, else the
chart's own Pushgateway, else empty (nothing pushed). */}}
{{- define "keel.pushgatewayUrl" -}}
{{- if .Values.config.pushgatewayUrl }}
{{- .Values.config.pushgatewayUrl }}
{{- else if .Values.pushgateway.enabled }}
{{- printf "%s-pushgateway.%s.svc.cluster.local:9091" (include "keel.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "keel.postgresHost" -}}
{{- if .Values.postgresql.enabled }}
{{- printf "%s-postgresql.%s.svc.cluster.local" (include "keel.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.postgresql.external.host }}
{{- end }}
{{- end }}

{{/* KubeRay names the head service <cluster>-head-svc */}}
{{- define "keel.rayHead" -}}
{{- printf "%s-train-head-svc.%s.svc.cluster.local" (include "keel.fullname" .) .Release.Namespace }}
{{- end }}

{{/* The most GPUs the training RayCluster can grow to: each group's gpus x maxReplicas (x replicas without the
autoscaler). Keel fails a run that asks for more at once instead of letting it wait for nodes that never come. */}}
{{- define "keel.rayMaxGpus" -}}
{{- $training := .Values.ray.training -}}
{{- $total := 0 -}}
{{- range $name, $group := $training.workerGroups -}}
{{- $pods := ternary $group.maxReplicas $group.replicas $training.autoscaling -}}
{{- $total = add $total (mul (int $group.gpus) (int $pods)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{- define "keel.serveName" -}}
{{- printf "%s-serve" (include "keel.fullname" .) }}
{{- end }}

{{/* The namespaces besides the release's that Kubeflow Pipelines runs steps in (a JSON list): a step's pod reads
the config and runs as the runner ServiceAccount of its own namespace, so each needs both. */}}
{{- define "keel.stepNamespaces" -}}
{{- toJson (without (uniq .Values.pipelineRunner.namespaces) .Release.Namespace) }}
{{- end }}

{{/* What a KFP v2 step's own machinery does as the pod's ServiceAccount, in the namespace the pod runs in,
besides reading Keel's config: KFP's driver and launcher read the kfp-launcher ConfigMap (optional, but a
refusal fails the step) and the artifact store's Secret (mlpipeline-minio-artifact unless kfp-launcher names
others: pipelineRunner.artifactSecrets), and Argo's executor reports outputs as workflowtaskresults (Argo 3.4+,
so KFP 2.1+). pipelineRunner.extraRules adds what another KFP or Argo release asks for. */}}
{{- define "keel.stepRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [{{ include "keel.fullname" . }}-config, kfp-launcher]
  verbs: [get]
{{- with .Values.pipelineRunner.artifactSecrets }}
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toJson . }}
  verbs: [get]
{{- end }}
- apiGroups: [argoproj.io]
  resources: [workflowtaskresults]
  verbs: [create, patch]
{{- with .Values.pipelineRunner.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "keel.runnerServiceAccount" -}}
{{- default (printf "%s-pipeline-runner" (include "keel.fullname" .)) .Values.pipelineRunner.name }}
{{- end }}

{{/* The runner ServiceAccount in one namespace: (dict "ctx" $ "namespace" "<namespace>"). Pipeline steps run as
it, so it carries the pull secrets (KFP's step pods name no imagePullSecrets of their own). */}}
{{- define "keel.runnerServiceAccountObject" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "keel.runnerServiceAccount" .ctx }}
  namespace: {{ .namespace }}
  labels:
    {{- include "keel.labels" (dict "ctx" .ctx "component" "pipeline-runner") | nindent 4 }}
automountServiceAccountToken: true
{{- include "keel.imagePullSecrets" (dict "ctx" .ctx "indent" 0) }}
{{- end }}

{{/* A pod spec's (or ServiceAccount's) imagePullSecrets, starting on a new line at "indent" spaces; nothing when
none are set. (dict "ctx" $ "indent" 6) */}}
{{- define "keel.imagePullSecrets" -}}
{{- with .ctx.Values.imagePullSecrets }}
{{- $secrets := list }}
{{- range . }}{{ $secrets = append $secrets (dict "name" .) }}{{ end }}
{{- toYaml (dict "imagePullSecrets" $secrets) | nindent $.indent }}
{{- end }}
{{- end }}

{{/* One env var from the credentials Secret: (dict "ctx" $ "env" "NAME" "key" "secret-key") */}}
{{- define "keel.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.credentials.existingSecret }}
      key: {{ .key }}
{{- end }}

{{/* S3 credentials as the variables MinIO clients, boto3 and Keel read */}}
{{- define "keel.s3CredentialEnv" -}}
{{ include "keel.secretEnv" (dict "ctx" . "env" "KEEL_S3_ACCESS_KEY" "key" .Values.credentials.s3AccessKeyKey) }}
{{ include "keel.secretEnv" (dict "ctx" . "env" "KEEL_S3_SECRET_KEY" "key" .Values.credentials.s3SecretKeyKey) }}
{{ include "keel.secretEnv" (dict "ctx" . "env" "AWS_ACCESS_KEY_ID" "key" .Values.credentials.s3AccessKeyKey) }}
{{ include "keel.secretEnv" (dict "ctx" . "env" "AWS_SECRET_ACCESS_KEY" "key" .Values.credentials.s3SecretKeyKey) }}
{{- end }}

{{/* Ray token auth env for every Ray container */}}
{{- define "keel.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: /var/run/secrets/keel/{{ .Values.credentials.rayAuthTokenKey }}
{{- end }}
{{- end }}

{{/* Writable scratch for read-only root filesystems */}}
{{- define "keel.scratchVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "keel.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- end }}

{{/* Refuse impossible combinations before anything reaches the cluster */}}
{{- define "keel.validate" -}}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.externalUri) }}
{{- fail "mlflow.enabled is false: set mlflow.externalUri to the tracking server the pipelines should use" }}
{{- end }}
{{- if and (not .Values.minio.enabled) (not .Values.minio.externalEndpoint) }}
{{- fail "minio.enabled is false: set minio.externalEndpoint to the S3 API endpoint holding the artifacts" }}
{{- end }}
{{- if and .Values.mlflow.enabled (not .Values.postgresql.enabled) (not .Values.postgresql.external.host) }}
{{- fail "postgresql.enabled is false: set postgresql.external.host for MLflow's backend store" }}
{{- end }}
{{- if and .Values.ray.training.enabled (not .Values.ray.training.workerGroups) }}
{{- fail "ray.training.workerGroups is empty: the training RayCluster needs at least one worker group" }}
{{- end }}
{{- range $name, $group := .Values.ray.training.workerGroups }}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) }}
{{- fail (printf "ray.training.workerGroups.%s: minReplicas (%d) is above maxReplicas (%d)" $name (int $group.minReplicas) (int $group.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}
