{{/*
Sidecar mode: named templates the legacy app's chart includes into its own pod spec. The app's chart depends
on this chart (name edge-proxy, no alias) with `mode: sidecar`, and passes this chart's context, so names and
values resolve exactly as they do here:

  template:
    metadata:
      annotations:
        {{- include "edge-proxy.sidecar.podAnnotations" (index .Subcharts "edge-proxy") | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ (index .Values "edge-proxy").terminationGracePeriodSeconds }}
      containers:
        - name: app
          ...
        {{- include "edge-proxy.sidecar" (index .Subcharts "edge-proxy") | nindent 8 }}
      volumes:
        {{- include "edge-proxy.sidecar.volumes" (index .Subcharts "edge-proxy") | nindent 8 }}

and points its Service's targetPort at the port named by `sidecar.portName` (default "edge-proxy").
A complete example: examples/legacy-app/.
*/}}

{{/*
The proxy container (one list item for `containers:`), forwarding to the app on 127.0.0.1:<sidecar.appPort>.
*/}}
{{- define "edge-proxy.sidecar" -}}
{{- include "edge-proxy.container" (dict "root" . "sidecar" true) }}
{{- end }}

{{/*
The proxy's volumes (list items for `volumes:`).
*/}}
{{- define "edge-proxy.sidecar.volumes" -}}
{{- include "edge-proxy.volumes" . }}
{{- end }}

{{/*
The pod-template annotation that restarts the pods when the proxy's config changes.
*/}}
{{- define "edge-proxy.sidecar.podAnnotations" -}}
checksum/edge-proxy-config: {{ include "edge-proxy.configYaml" . | sha256sum }}
{{- end }}
