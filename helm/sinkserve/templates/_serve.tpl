{{/*
The Ray Serve config (RayService.spec.serveConfigV2). `args` is the app's own config model,
sinkserve.config.Settings, so the replica validates exactly what is rendered here; the deployment
override repeats the scheduling part (replicas, actor resources, bundles) where Ray Serve reads it.
The Redis password is not in here: the pods get it as SINKSERVE_REDIS__PASSWORD from the Secret.
*/}}
{{- define "sinkserve.serveArgs" -}}
{{- $e := .Values.engine }}
{{- $r := .Values.replica }}
{{- $engine := dict "model" $e.model "dtype" $e.dtype "weights" $e.weights "packed_max_rows" (int $e.packedMaxRows) "device" $e.device "policy" $e.policy "sinks" (int $e.sinks) "window" (int $e.window) "slots" (int $e.slotsPerReplica) "prefill_chunk" (int $e.prefillChunk) "max_step_tokens" (int $e.maxStepTokens) "decode_stretch" $e.decodeStretch "min_prefill_tokens" (int $e.minPrefillTokens) }}
{{- if not (kindIs "invalid" $e.maxContext) }}{{ $_ := set $engine "max_context" (int $e.maxContext) }}{{ end }}
{{- if not (kindIs "invalid" $e.seed) }}{{ $_ := set $engine "seed" (int $e.seed) }}{{ end }}
{{- if not (kindIs "invalid" $e.numThreads) }}{{ $_ := set $engine "num_threads" (int $e.numThreads) }}{{ end }}
{{- $replica := dict "num_replicas" (int $r.numReplicas) "num_cpus" $r.numCpus "num_gpus" $r.numGpus "tensor_parallel" (int $r.tensorParallel) "max_ongoing_requests" (int $r.maxOngoingRequests) "load_report_interval_s" $r.loadReportIntervalS "health_check_period_s" $r.healthCheckPeriodS "health_check_timeout_s" $r.healthCheckTimeoutS "graceful_shutdown_timeout_s" $r.gracefulShutdownTimeoutS }}
{{- if $r.autoscaling.enabled }}
{{- $a := $r.autoscaling }}
{{- $_ := set $replica "autoscaling" (dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_requests" $a.targetOngoingRequests "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS) }}
{{- end }}
{{- $router := dict "lease_ttl_s" .Values.router.leaseTtlS "load_factor" .Values.router.loadFactor }}
{{- $redis := dict "url" (include "sinkserve.redisUrl" .) "key_prefix" .Values.redis.keyPrefix "socket_timeout_s" .Values.redis.socketTimeoutS }}
{{- $limits := dict "max_sessions" (int .Values.limits.maxSessions) "tokens_per_minute" (int .Values.limits.tokensPerMinute) "requests_per_second" .Values.limits.requestsPerSecond "request_burst" (int .Values.limits.requestBurst) }}
{{- $ray := dict "namespace" .Values.ray.namespace "app_name" .Values.serve.appName }}
{{- toYaml (dict "engine" $engine "replica" $replica "router" $router "redis" $redis "limits" $limits "ray" $ray) }}
{{- end }}

{{- define "sinkserve.serveDeployment" -}}
{{- $r := .Values.replica }}
{{- $d := dict "name" .Values.serve.deploymentName "max_ongoing_requests" (int $r.maxOngoingRequests) "health_check_period_s" $r.healthCheckPeriodS "health_check_timeout_s" $r.healthCheckTimeoutS "graceful_shutdown_timeout_s" $r.gracefulShutdownTimeoutS }}
{{- if $r.autoscaling.enabled }}
{{- $a := $r.autoscaling }}
{{- $_ := set $d "autoscaling_config" (dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_requests" $a.targetOngoingRequests "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS) }}
{{- else }}
{{- $_ := set $d "num_replicas" (int $r.numReplicas) }}
{{- end }}
{{- $_ := set $d "ray_actor_options" (dict "num_cpus" $r.numCpus "num_gpus" $r.numGpus) }}
{{- if gt (int $r.tensorParallel) 1 }}
{{- /* One bundle per shard, packed on one node; the replica actor itself lives in bundle 0. */}}
{{- $shard := dict "CPU" $r.numCpus }}
{{- if gt (float64 $r.numGpus) 0.0 }}{{ $_ := set $shard "GPU" $r.numGpus }}{{ end }}
{{- $bundles := list }}
{{- range $i := until (int $r.tensorParallel) }}
{{- $bundles = append $bundles (deepCopy $shard) }}
{{- end }}
{{- $_ := set $d "placement_group_bundles" $bundles }}
{{- $_ := set $d "placement_group_strategy" $r.placementGroupStrategy }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{- define "sinkserve.serveConfig" -}}
{{- /* route_prefix null: the app has no HTTP route (clients go through the gateway). */}}
{{- $app := dict "name" .Values.serve.appName "import_path" .Values.serve.importPath "route_prefix" nil "args" (include "sinkserve.serveArgs" . | fromYaml) "deployments" (list (include "sinkserve.serveDeployment" . | fromYaml)) }}
{{- toYaml (dict "proxy_location" .Values.serve.proxyLocation "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app)) }}
{{- end }}
