{{/* Names, labels and the values the templates share. */}}

{{- define "sinkserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name. Kept short: KubeRay derives longer names from the RayService's. */}}
{{- define "sinkserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sinkserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sinkserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sinkserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sinkserve.labels" -}}
helm.sh/chart: {{ include "sinkserve.chart" . }}
{{ include "sinkserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sinkserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pods carrying this label may reach Redis (see networkpolicy.yaml). */}}
{{- define "sinkserve.redisClientLabel" -}}
sinkserve.dev/redis-client: "true"
{{- end }}

{{- define "sinkserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sinkserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sinkserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "sinkserve.gatewayImage" -}}
{{- $img := .Values.gateway.image | default dict -}}
{{- $repo := $img.repository | default .Values.image.repository -}}
{{- $tag := $img.tag | default (.Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant)) -}}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* KubeRay names the stable head Service of a RayService "<rayservice>-head-svc". */}}
{{- define "sinkserve.rayHeadService" -}}
{{- printf "%s-head-svc" (include "sinkserve.fullname" .) }}
{{- end }}

{{- define "sinkserve.rayHeadAddress" -}}
{{- .Values.gateway.rayHeadAddress | default (printf "%s:6379" (include "sinkserve.rayHeadService" .)) }}
{{- end }}

{{/* Redis: where it is, and which Secret holds its password. */}}
{{- define "sinkserve.redisHost" -}}
{{- if eq .Values.redis.mode "external" }}
{{- .Values.redis.external.host }}
{{- else }}
{{- printf "%s-redis" (include "sinkserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "sinkserve.redisPort" -}}
{{- if eq .Values.redis.mode "external" }}{{ .Values.redis.external.port }}{{ else }}6379{{ end }}
{{- end }}

{{- define "sinkserve.redisTls" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls }}true{{ end }}
{{- end }}

{{- define "sinkserve.redisUrl" -}}
{{- printf "%s://%s:%s/%d" (ternary "rediss" "redis" (eq (include "sinkserve.redisTls" .) "true")) (include "sinkserve.redisHost" .) (include "sinkserve.redisPort" .) (int .Values.redis.db) }}
{{- end }}

{{- define "sinkserve.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "sinkserve.fullname" .)) }}
{{- end }}

{{- define "sinkserve.rayAuthSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-auth" (include "sinkserve.fullname" .)) }}
{{- end }}

{{/* Env every Redis client of ours gets: URL, key prefix, and the password from the Secret. */}}
{{- define "sinkserve.redisEnv" -}}
- name: SINKSERVE_REDIS__URL
  value: {{ include "sinkserve.redisUrl" . | quote }}
- name: SINKSERVE_REDIS__KEY_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
- name: SINKSERVE_REDIS__SOCKET_TIMEOUT_S
  value: {{ .Values.redis.socketTimeoutS | quote }}
- name: SINKSERVE_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "sinkserve.redisSecretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
{{- end }}

{{/* Env shared by Ray head and workers: Redis (URL + password from the Secret), no downloads at run time. */}}
{{- define "sinkserve.rayEnv" -}}
{{ include "sinkserve.redisEnv" . }}
- name: SINKSERVE_RAY__NAMESPACE
  value: {{ .Values.ray.namespace | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The `ray` user of Ray's images (uid 1000, gid 100), which deploy/Dockerfile keeps. */}}
{{- define "sinkserve.rayPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "sinkserve.rayContainerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end }}

{{/*
Checks JSON schema cannot express (relations between values). Each fails the render with a message
that names the values to change.
*/}}
{{- define "sinkserve.validate" -}}
{{- $r := .Values.replica }}
{{- if and $r.autoscaling.enabled (lt (int $r.autoscaling.maxReplicas) (int $r.autoscaling.minReplicas)) }}
{{- fail (printf "replica.autoscaling.maxReplicas (%v) must be >= replica.autoscaling.minReplicas (%v)" $r.autoscaling.maxReplicas $r.autoscaling.minReplicas) }}
{{- end }}
{{- $ga := .Values.gateway.autoscaling }}
{{- if and $ga.enabled (lt (int $ga.maxReplicas) (int $ga.minReplicas)) }}
{{- fail (printf "gateway.autoscaling.maxReplicas (%v) must be >= gateway.autoscaling.minReplicas (%v)" $ga.maxReplicas $ga.minReplicas) }}
{{- end }}
{{- $names := dict }}
{{- $maxGpusPerPod := 0 }}
{{- range .Values.ray.workerGroups }}
{{- if hasKey $names .name }}
{{- fail (printf "ray.workerGroups: group name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if lt (int .maxReplicas) (int .minReplicas) }}
{{- fail (printf "ray.workerGroups[%s]: maxReplicas (%v) must be >= minReplicas (%v)" .name .maxReplicas .minReplicas) }}
{{- end }}
{{- if or (lt (int .replicas) (int .minReplicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "ray.workerGroups[%s]: replicas (%v) must lie between minReplicas (%v) and maxReplicas (%v)" .name .replicas .minReplicas .maxReplicas) }}
{{- end }}
{{- if gt (int .gpus) $maxGpusPerPod }}{{ $maxGpusPerPod = int .gpus }}{{ end }}
{{- end }}
{{- if and (gt (float64 $r.numGpus) 0.0) (eq $maxGpusPerPod 0) }}
{{- fail "replica.numGpus > 0 but no worker group has GPUs: set ray.workerGroups[].gpus, or replica.numGpus: 0 for CPU-only" }}
{{- end }}
{{- /* One replica's shards share a node (STRICT_PACK), so they must fit in one worker pod. */}}
{{- $gpusPerReplica := mulf (float64 $r.numGpus) (float64 $r.tensorParallel) }}
{{- if and (gt $gpusPerReplica 0.0) (gt $gpusPerReplica (float64 $maxGpusPerPod)) (eq $r.placementGroupStrategy "STRICT_PACK") }}
{{- fail (printf "a replica needs replica.numGpus x replica.tensorParallel = %v GPUs on one node (STRICT_PACK), but the largest worker group has %d GPUs per pod: raise ray.workerGroups[].gpus or lower replica.tensorParallel" $gpusPerReplica $maxGpusPerPod) }}
{{- end }}
{{- /* The CPUs Ray sees in each worker pod: rayStartParams num-cpus, else the container's CPU limit (what KubeRay
passes), else its request; "500m" is half a CPU. A group that says none is not checked. */}}
{{- $maxCpusPerPod := 0.0 }}
{{- range .Values.ray.workerGroups }}
{{- $res := .resources | default dict }}
{{- $cpu := index (.rayStartParams | default dict) "num-cpus" | default ($res.limits | default dict).cpu | default ($res.requests | default dict).cpu | default "" | toString }}
{{- if $cpu }}
{{- $n := 0.0 }}
{{- if hasSuffix "m" $cpu }}{{ $n = divf (trimSuffix "m" $cpu | float64) 1000.0 }}{{ else }}{{ $n = float64 $cpu }}{{ end }}
{{- if gt $n $maxCpusPerPod }}{{ $maxCpusPerPod = $n }}{{ end }}
{{- end }}
{{- end }}
{{- $cpusPerReplica := mulf (float64 $r.numCpus) (float64 $r.tensorParallel) }}
{{- if and (gt $maxCpusPerPod 0.0) (gt $cpusPerReplica $maxCpusPerPod) (eq $r.placementGroupStrategy "STRICT_PACK") }}
{{- fail (printf "a replica needs replica.numCpus x replica.tensorParallel = %v CPUs on one node (STRICT_PACK), but the largest worker group has %v CPUs per pod: raise ray.workerGroups[].resources cpu or lower replica.numCpus or replica.tensorParallel" $cpusPerReplica $maxCpusPerPod) }}
{{- end }}
{{- /* The bundled model's 9 attention heads, 3 KV heads and FFN width 1536 split only in 1 or 3 (the engine refuses
other sizes at start; a checkpoint path is checked there, when its config is read). */}}
{{- if and (eq .Values.engine.model "smollm2-135m-instruct") (not (has (int $r.tensorParallel) (list 1 3))) }}
{{- fail (printf "replica.tensorParallel %d does not split the bundled model (9 attention heads, 3 KV heads, FFN width 1536); sizes that do: 1, 3" (int $r.tensorParallel)) }}
{{- end }}
{{- if and (gt (int $r.tensorParallel) 1) (has .Values.engine.weights (list "int4" "int8")) }}
{{- fail (printf "engine.weights %s is not split into shards: set engine.weights dense (or auto) with replica.tensorParallel > 1, or replica.tensorParallel 1" .Values.engine.weights) }}
{{- end }}
{{- if and (eq (float64 $r.numGpus) 0.0) (hasPrefix "cuda" .Values.engine.device) }}
{{- fail (printf "engine.device is %q but replica.numGpus is 0: a replica would see no GPU" .Values.engine.device) }}
{{- end }}
{{- if eq .Values.engine.weights "int4" }}
{{- if eq .Values.engine.dtype "float32" }}
{{- fail "engine.weights int4 needs engine.dtype bfloat16 or float16 (torch's float32 int4 kernel is a slow reference path)" }}
{{- end }}
{{- if or (gt (float64 $r.numGpus) 0.0) (hasPrefix "cuda" .Values.engine.device) }}
{{- fail "engine.weights int4 runs torch's packed CPU kernel: set replica.numGpus 0 and engine.device cpu, or engine.weights dense" }}
{{- end }}
{{- end }}
{{- if eq .Values.engine.weights "int8" }}
{{- if not (has .Values.engine.dtype (list "auto" "float32")) }}
{{- fail "engine.weights int8 computes in float32 (fbgemm's int8 GEMM): set engine.dtype float32 or auto" }}
{{- end }}
{{- if or (gt (float64 $r.numGpus) 0.0) (hasPrefix "cuda" .Values.engine.device) }}
{{- fail "engine.weights int8 runs fbgemm's CPU kernel: set replica.numGpus 0 and engine.device cpu, or engine.weights dense" }}
{{- end }}
{{- end }}
{{- if and .Values.gateway.tls.enabled (not .Values.gateway.tls.secretName) }}
{{- fail "gateway.tls.enabled needs gateway.tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and .Values.gateway.ingress.enabled (not .Values.gateway.ingress.host) }}
{{- fail "gateway.ingress.enabled needs gateway.ingress.host" }}
{{- end }}
{{- if and .Values.gateway.grpcRoute.enabled (not .Values.gateway.grpcRoute.parentRefs) }}
{{- fail "gateway.grpcRoute.enabled needs gateway.grpcRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- end }}
