{{/*
Expand the name of the chart.
*/}}
{{- define "edge-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "edge-proxy.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "edge-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "edge-proxy.labels" -}}
helm.sh/chart: {{ include "edge-proxy.chart" . }}
{{ include "edge-proxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: {{ ternary "sidecar" "definitions-fleet" (eq .Values.mode "sidecar") }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "edge-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "edge-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edge-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: a digest wins over a tag; the tag defaults to the chart's appVersion.
*/}}
{{- define "edge-proxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The config file edge-proxy reads (proxy/settings.py), as YAML: the chart-managed keys, then `.Values.config`
on top. bind follows containerPort; service_mode, upstream.url, the memory budget and the metrics path follow
the mode.
Secrets never appear here: REDIS_URL, REDIS_SENTINEL_PASSWORD and VERDICT_HMAC_KEY come from Secret references
(env valueFrom).
*/}}
{{- define "edge-proxy.configYaml" -}}
{{- $user := deepCopy (default (dict) .Values.config) }}
{{- include "edge-proxy.validate" . }}
{{- $managed := dict "bind" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- if .Values.healthPort }}
{{- $_ := set $managed "health_port" (int .Values.healthPort) }}
{{- /* In front of an app the public reaches: neither readiness's reasons nor the metrics on its port. */}}
{{- if eq .Values.mode "sidecar" }}
{{- $_ := set $managed "health_port_only" true }}
{{- end }}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
{{- $_ := set $managed "service_mode" "all" }}
{{- $_ := set $managed "upstream" (dict "url" (printf "http://127.0.0.1:%d" (int .Values.sidecar.appPort))) }}
{{- $_ := set $managed "definitions" (dict "cache_budget_bytes" (int64 .Values.sidecar.cacheBudgetBytes)) }}
{{- /* The app behind the sidecar may serve /metrics itself; the proxy answers its own path and never forwards it. */}}
{{- $_ := set $managed "telemetry" (dict "metrics_path" .Values.sidecar.metricsPath) }}
{{- else }}
{{- $_ := set $managed "service_mode" "definitions" }}
{{- end }}
{{- $config := mustMergeOverwrite $managed $user }}
{{- include "edge-proxy.validateConfig" (dict "config" $config "Values" .Values) }}
{{- toYaml $config }}
{{- end }}

{{/*
The settings' checks across keys (proxy/settings.py, Settings._distinct_routes and _worker_metrics_ports), on
the config as rendered: the schema sees one key at a time, and the pods would refuse to start. The defaults
here are the app's (tests/test_chart.py renders each case and runs check-config on it).
*/}}
{{- define "edge-proxy.validateConfig" -}}
{{- $config := .config }}
{{- if and (dig "health_port_only" false $config) (not (hasKey $config "health_port")) }}
{{- fail "config.health_port_only needs healthPort: the health paths would be answered nowhere" }}
{{- end }}
{{- $definitions := default (dict) $config.definitions }}
{{- $telemetry := default (dict) $config.telemetry }}
{{- $routes := list }}
{{- range list "/_liveness" "/_readiness" "/_startup" }}
{{- $routes = append $routes (list "the health probes" .) }}
{{- end }}
{{- $routes = append $routes (list "config.definitions.path" (default "/flags/definitions" $definitions.path)) }}
{{- /* hasKey, not default: an empty aliases list means none. */}}
{{- $aliases := ternary $definitions.aliases (list "/api/feature_flag/local_evaluation" "/api/feature_flag/local_evaluation/") (hasKey $definitions "aliases") }}
{{- range $aliases }}
{{- $routes = append $routes (list "config.definitions.aliases" .) }}
{{- end }}
{{- $metricsEnabled := dig "metrics_enabled" true $telemetry }}
{{- if $metricsEnabled }}
{{- $routes = append $routes (list "config.telemetry.metrics_path" (default "/metrics" $telemetry.metrics_path)) }}
{{- end }}
{{- $seen := dict }}
{{- range $routes }}
{{- $key := index . 0 }}
{{- $path := index . 1 }}
{{- if hasKey $seen $path }}
{{- fail (printf "%s: %q is already the route of %s (the proxy serves each path once and refuses to start)" $key $path (get $seen $path)) }}
{{- end }}
{{- $_ := set $seen $path $key }}
{{- end }}
{{- with $telemetry.worker_metrics_port }}
{{- $first := int . }}
{{- $last := add $first (int (default 1 $config.workers)) -1 }}
{{- if not $metricsEnabled }}
{{- fail "config.telemetry.worker_metrics_port needs config.telemetry.metrics_enabled" }}
{{- end }}
{{- $ports := ternary (printf "port %d" $first) (printf "ports %d-%d (one per worker)" $first $last) (eq $first $last) }}
{{- if gt $last 65535 }}
{{- fail (printf "config.telemetry.worker_metrics_port: %s go past 65535" $ports) }}
{{- end }}
{{- $taken := dict "containerPort (config bind)" (int $.Values.containerPort) }}
{{- if $.Values.healthPort }}
{{- $_ := set $taken "healthPort (config health_port)" (int $.Values.healthPort) }}
{{- end }}
{{- if eq $.Values.mode "sidecar" }}
{{- $_ := set $taken "sidecar.appPort (the app's, in the same pod)" (int $.Values.sidecar.appPort) }}
{{- end }}
{{- range $name, $port := $taken }}
{{- if and (le $first $port) (ge $last $port) }}
{{- fail (printf "config.telemetry.worker_metrics_port: %s would take %s %d" $ports $name $port) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refusals the schema cannot express (the config's own cross-key checks: edge-proxy.validateConfig): inline secrets, a bind the probes would not find, a fleet without an
upstream, a drain that does not fit the grace period.
*/}}
{{- define "edge-proxy.validate" -}}
{{- $config := default (dict) .Values.config }}
{{- if hasKey $config "bind" }}
{{- fail "config.bind is managed by the chart: set containerPort instead" }}
{{- end }}
{{- if hasKey $config "health_port" }}
{{- fail "config.health_port is managed by the chart: set healthPort instead" }}
{{- end }}
{{- with .Values.healthPort }}
{{- if eq (int .) (int $.Values.containerPort) }}
{{- fail "healthPort and containerPort must differ: the probes' listener is a port of its own" }}
{{- end }}
{{- if and (eq $.Values.mode "sidecar") (eq (int .) (int $.Values.sidecar.appPort)) }}
{{- fail "healthPort and sidecar.appPort must differ: the proxy and the app share the pod's network namespace" }}
{{- end }}
{{- end }}
{{- if hasKey (default (dict) $config.redis) "url" }}
{{- fail "config.redis.url would put a credential in a ConfigMap: set redis.existingSecret.name/key instead" }}
{{- end }}
{{- if hasKey (default (dict) $config.redis) "sentinel_password" }}
{{- fail "config.redis.sentinel_password would put a secret in a ConfigMap: set redis.sentinelPassword.existingSecret instead" }}
{{- end }}
{{- if hasKey (default (dict) (default (dict) $config.definitions).auth) "hmac_key" }}
{{- fail "config.definitions.auth.hmac_key would put a secret in a ConfigMap: set verdictHmacKey.existingSecret instead" }}
{{- end }}
{{- if not .Values.redis.existingSecret.name }}
{{- fail "redis.existingSecret.name is required: the name of an existing Secret holding the Redis URL (never inline it)" }}
{{- end }}
{{- if and (eq .Values.mode "fleet") (not (dig "upstream" "url" "" $config)) }}
{{- fail "mode fleet needs config.upstream.url: the legacy backend's Service URL, where misses are forwarded" }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") (eq (int .Values.sidecar.appPort) (int .Values.containerPort)) }}
{{- fail "sidecar.appPort and containerPort must differ: the proxy and the app share the pod's network namespace" }}
{{- end }}
{{- $drain := float64 (dig "shutdown_timeout_seconds" 20 $config) }}
{{- $flush := float64 (dig "billing" "final_flush_timeout_seconds" 5 $config) }}
{{- $budget := addf (float64 .Values.preStop.sleepSeconds) $drain $flush }}
{{- /* A second to spare; with OTLP export, also the last exports' 2.5 s (telemetry.FINAL_EXPORT_SECONDS). */}}
{{- $otlp := dig "telemetry" "otlp_endpoint" "" $config }}
{{- range .Values.extraEnv }}
{{- if eq .name "OTEL_EXPORTER_OTLP_ENDPOINT" }}{{- $otlp = "from extraEnv" }}{{- end }}
{{- end }}
{{- $spare := ternary 3.5 1.0 (not (empty $otlp)) }}
{{- if gt (addf $budget $spare) (float64 .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "preStop.sleepSeconds + config.shutdown_timeout_seconds + config.billing.final_flush_timeout_seconds = %vs does not fit in terminationGracePeriodSeconds (%v) with %vs to spare (a second, and the last OTLP exports' 2.5 s when they are on): Kubernetes would SIGKILL during the final billing flush" $budget .Values.terminationGracePeriodSeconds $spare) }}
{{- end }}
{{- if and (eq .Values.mode "fleet") .Values.serviceMonitor.enabled (gt (int (dig "workers" 1 $config)) 1) }}
{{- fail "serviceMonitor.enabled with config.workers > 1: every scrape of the shared port reaches one worker, and its counts replace the last one's (counter resets): run one worker per pod and scale pods" }}
{{- end }}
{{- $own := fromYaml (include "edge-proxy.labels" .) }}
{{- range $key, $_ := default (dict) .Values.podLabels }}
{{- if hasKey $own $key }}
{{- fail (printf "podLabels may not set %s: the chart sets it (and the selector may depend on it)" $key) }}
{{- end }}
{{- end }}
{{- /* The same for the other maps rendered next to the chart's own keys (a repeated YAML key: which one wins is the parser's). */}}
{{- if hasKey (default (dict) .Values.podAnnotations) "checksum/config" }}
{{- fail "podAnnotations may not set checksum/config: the chart sets it to the config's checksum, which rolls the pods when the config changes" }}
{{- end }}
{{- range $key, $_ := default (dict) .Values.serviceMonitor.labels }}
{{- if hasKey $own $key }}
{{- fail (printf "serviceMonitor.labels may not set %s: the chart sets it" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The proxy container, shared by the fleet Deployment and the sidecar. Called with
(dict "root" <chart context> "sidecar" <bool>).
*/}}
{{- define "edge-proxy.container" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $portName := ternary $v.sidecar.portName "http" .sidecar -}}
{{- /* Startup and liveness on the probes' own port when there is one, outside the client connection limit;
readiness on the clients' port, whose listener closes when a drain begins. */}}
{{- $healthPortName := ternary $v.sidecar.healthPortName "health" .sidecar -}}
{{- $probePort := ternary $healthPortName $portName (not (empty $v.healthPort)) -}}
{{- /* Readiness too when the health paths are answered there only (config health_port_only, the sidecar's
default): on the clients' port they are the app's. */}}
{{- $healthOnly := and (not (empty $v.healthPort)) (dig "health_port_only" .sidecar (default (dict) $v.config)) -}}
{{- $readinessPort := ternary $healthPortName $portName $healthOnly -}}
- name: {{ ternary $v.sidecar.containerName $root.Chart.Name .sidecar }}
  image: {{ include "edge-proxy.image" $root | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["serve", "--config", "/etc/edge-proxy/config.yaml"]
  ports:
    - name: {{ $portName }}
      containerPort: {{ $v.containerPort }}
      protocol: TCP
    {{- if $v.healthPort }}
    - name: {{ $healthPortName }}
      containerPort: {{ $v.healthPort }}
      protocol: TCP
    {{- end }}
  env:
    - name: REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ $v.redis.existingSecret.name }}
          key: {{ $v.redis.existingSecret.key }}
    {{- if $v.verdictHmacKey.existingSecret.name }}
    - name: VERDICT_HMAC_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $v.verdictHmacKey.existingSecret.name }}
          key: {{ $v.verdictHmacKey.existingSecret.key }}
    {{- end }}
    {{- if $v.redis.sentinelPassword.existingSecret.name }}
    - name: REDIS_SENTINEL_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ $v.redis.sentinelPassword.existingSecret.name }}
          key: {{ $v.redis.sentinelPassword.existingSecret.key }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.startupProbe }}
  startupProbe:
    {{- include "edge-proxy.probe" (list . $probePort) | nindent 4 }}
  {{- end }}
  {{- with $v.livenessProbe }}
  livenessProbe:
    {{- include "edge-proxy.probe" (list . $probePort) | nindent 4 }}
  {{- end }}
  {{- with (ternary $v.sidecar.readinessProbe $v.readinessProbe .sidecar) }}
  readinessProbe:
    {{- include "edge-proxy.probe" (list . $readinessPort) | nindent 4 }}
  {{- end }}
  lifecycle:
    preStop:
      {{- if $v.preStop.useSleepAction }}
      sleep:
        seconds: {{ $v.preStop.sleepSeconds }}
      {{- else }}
      exec:
        command: ["sleep", {{ $v.preStop.sleepSeconds | quote }}]
      {{- end }}
  {{- with (ternary $v.sidecar.resources $v.resources .sidecar) }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: {{ include "edge-proxy.volumeName" $root }}
      mountPath: /etc/edge-proxy
      readOnly: true
    - name: {{ include "edge-proxy.volumeName" $root }}-tmp
      mountPath: /tmp
{{- end }}

{{/*
Volume names carry the chart name, so they cannot clash with the app's own volumes in sidecar mode. A volume
name is a DNS label (63 characters at most), and "-config-tmp" takes 11.
*/}}
{{- define "edge-proxy.volumeName" -}}
{{- include "edge-proxy.name" . | trunc 52 | trimSuffix "-" }}-config
{{- end }}

{{/*
The proxy's volumes: its ConfigMap, and a small memory-backed /tmp (the root filesystem is read-only).
*/}}
{{- define "edge-proxy.volumes" -}}
- name: {{ include "edge-proxy.volumeName" . }}
  configMap:
    name: {{ include "edge-proxy.fullname" . }}
- name: {{ include "edge-proxy.volumeName" . }}-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- end }}

{{/*
A probe from values: an httpGet one gets the container's port; one overridden with another handler (exec,
tcpSocket, grpc) loses the default httpGet that values merging keeps beside it (two handlers: refused).
*/}}
{{- define "edge-proxy.probe" -}}
{{- $probe := index . 0 }}
{{- $port := index . 1 }}
{{- if or (hasKey $probe "exec") (hasKey $probe "tcpSocket") (hasKey $probe "grpc") }}
{{- toYaml (omit $probe "httpGet") }}
{{- else }}
{{- toYaml (mustMergeOverwrite (dict "httpGet" (dict "port" $port)) $probe) }}
{{- end }}
{{- end }}
