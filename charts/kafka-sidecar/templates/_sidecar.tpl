{{/*
The sidecar's public named templates. Each takes this chart's context: `.` here, or
`(index .Subcharts "kafka-sidecar")` in a parent chart that has this chart as a dependency
(its values then come from the parent's `kafka-sidecar:` block). README.md shows the use.

  kafka-sidecar.container            the sidecar container (a list item) for initContainers
                                     (native) or containers (sidecar.native=false)
  kafka-sidecar.volumes              the pod volumes it needs (list items)
  kafka-sidecar.appVolumeMounts      the socket folder, for the app container (list items)
  kafka-sidecar.appEnv               KAFKA_SIDECAR_TARGET etc., for the app container
  kafka-sidecar.socketGroup          the gid the socket is given, which the pod must give both
                                     containers (fsGroup or supplementalGroups); "" if none
  kafka-sidecar.terminationGracePeriodSeconds   the derived pod grace, a number
  kafka-sidecar.configChecksum       a pod annotation value that rolls pods on config change
  kafka-sidecar.configMapName        the ConfigMap this chart renders (config.yaml)
  kafka-sidecar.configYaml           the sidecar config file itself
*/}}

{{- define "kafka-sidecar.configMapName" -}}
{{- printf "%s-config" (include "kafka-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-sidecar.socketPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.sidecar.socketDir) .Values.sidecar.socketName }}
{{- end }}

{{/*
The socket's group: sidecar.socketGroup, else the pod's fsGroup (podSecurityContext.fsGroup),
else "" (the socket keeps the group it is created with).
*/}}
{{- define "kafka-sidecar.socketGroup" -}}
{{- $pod := .Values.podSecurityContext | default dict }}
{{- if not (kindIs "invalid" .Values.sidecar.socketGroup) }}
{{- int .Values.sidecar.socketGroup }}
{{- else if not (kindIs "invalid" $pod.fsGroup) }}
{{- int $pod.fsGroup }}
{{- end }}
{{- end }}

{{/*
Fails unless the app container can connect to the socket, which takes write permission. A mode
that admits only the socket's owner and group needs the app in that group: the socket group (kafka-sidecar.socketGroup, or
else the group the sidecar runs as) must be one the pod gives both containers: its fsGroup or
supplementalGroups, or a runAsGroup both run as. Otherwise the app gets "permission denied".
For this chart's own Deployment.
*/}}
{{- define "kafka-sidecar.checkSocketAccess" -}}
{{- $mode := toString .Values.sidecar.socketMode }}
{{- $writable := list "2" "3" "6" "7" }}
{{- if not (has (trunc -1 $mode) $writable) }}
{{- if not (has (trunc 1 (trunc -2 $mode)) $writable) }}
{{- fail (printf "sidecar.socketMode %s admits the sidecar's user alone: connecting takes write permission, so the app needs it through the socket's group (0660) or as any user (0666)" $mode) }}
{{- end }}
{{- $pod := .Values.podSecurityContext | default dict }}
{{- $appContext := .Values.app.securityContext | default dict }}
{{- $sidecarContext := .Values.sidecar.securityContext | default dict }}
{{- $appPrimary := ternary $pod.runAsGroup $appContext.runAsGroup (kindIs "invalid" $appContext.runAsGroup) }}
{{- $sidecarPrimary := ternary $pod.runAsGroup $sidecarContext.runAsGroup (kindIs "invalid" $sidecarContext.runAsGroup) }}
{{- $shared := list }}
{{- if not (kindIs "invalid" $pod.fsGroup) }}
{{- $shared = append $shared (int $pod.fsGroup) }}
{{- end }}
{{- range $pod.supplementalGroups }}
{{- $shared = append $shared (int .) }}
{{- end }}
{{- if and (not (kindIs "invalid" $appPrimary)) (not (kindIs "invalid" $sidecarPrimary)) }}
{{- if eq (int $appPrimary) (int $sidecarPrimary) }}
{{- $shared = append $shared (int $appPrimary) }}
{{- end }}
{{- end }}
{{- $group := include "kafka-sidecar.socketGroup" . }}
{{- if and (eq $group "") (not (kindIs "invalid" $sidecarPrimary)) }}
{{- $group = toString (int $sidecarPrimary) }}
{{- end }}
{{- if or (eq $group "") (not (has (int $group) $shared)) }}
{{- fail (printf "sidecar.socketMode %s admits only the socket's owner and group, but the pod does not give the app that group (%s): set podSecurityContext.fsGroup (or sidecar.socketGroup to one of podSecurityContext.supplementalGroups), or sidecar.socketMode \"0666\"" $mode (ternary "none set" (printf "gid %s" $group) (eq $group ""))) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The config file: the values' sidecar.config with `listen` set from the chart values. The
consumer API stays inside the pod (the Unix socket, mode 0660 and the pod's shared group by
default, so the app container reaches it through its fsGroup, and loopback TCP); only the
health-only listener and the metrics endpoint bind the pod IP, for kubelet's probes and
Prometheus.
*/}}
{{- define "kafka-sidecar.configYaml" -}}
{{- $sidecar := .Values.sidecar }}
{{- $config := deepCopy $sidecar.config }}
{{- if hasKey $config "listen" }}
{{- fail "sidecar.config.listen is set by the chart: use sidecar.grpc, sidecar.health, sidecar.metrics, sidecar.socketDir, sidecar.socketMode, sidecar.socketGroup and sidecar.authToken instead" }}
{{- end }}
{{- $ports := list (int $sidecar.grpc.port) (int $sidecar.health.port) }}
{{- if $sidecar.metrics.enabled }}
{{- $ports = append $ports (int $sidecar.metrics.port) }}
{{- end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "sidecar.grpc.port, sidecar.health.port and sidecar.metrics.port must differ (%s)" (join ", " $ports)) }}
{{- end }}
{{- $listen := dict
    "grpc" (list (printf "unix://%s" (include "kafka-sidecar.socketPath" .)) (printf "127.0.0.1:%v" $sidecar.grpc.port))
    "health" (printf "%s:%v" $sidecar.health.host $sidecar.health.port)
    "metrics" nil
    "unix_socket_mode" (toString $sidecar.socketMode) }}
{{- if $sidecar.metrics.enabled }}
{{- $_ := set $listen "metrics" (printf "%s:%v" $sidecar.metrics.host $sidecar.metrics.port) }}
{{- end }}
{{- $group := include "kafka-sidecar.socketGroup" . }}
{{- if ne $group "" }}
{{- $_ := set $listen "unix_socket_group" (int $group) }}
{{- end }}
{{- $_ := set $config "listen" $listen }}
{{- toYaml $config }}
{{- end }}

{{- define "kafka-sidecar.configChecksum" -}}
{{- include "kafka-sidecar.configYaml" . | sha256sum }}
{{- end }}

{{/* shutdown_grace_ms rounded up to whole seconds (the sidecar's default: 30000). */}}
{{- define "kafka-sidecar.shutdownGraceSeconds" -}}
{{- $ms := 30000 }}
{{- if hasKey .Values.sidecar.config "shutdown_grace_ms" }}
{{- $ms = int .Values.sidecar.config.shutdown_grace_ms }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds, unless set explicitly (it may not be shorter than the
sidecar's shutdown grace):
  native sidecar:  app drain + sidecar grace + margin. kubelet stops the app first and the
                   sidecar only once the app has exited, all within this one budget.
  classic sidecar: max(app drain, sidecar grace) + margin. Both get SIGTERM at once: the
                   sidecar sends `draining` and waits for the app's settles.
app drain is app.drainSeconds, by default the sidecar's grace.
*/}}
{{- define "kafka-sidecar.terminationGracePeriodSeconds" -}}
{{- $grace := int (include "kafka-sidecar.shutdownGraceSeconds" .) }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $explicit := int .Values.terminationGracePeriodSeconds }}
{{- if lt $explicit $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) is shorter than the sidecar's shutdown grace (%ds): the sidecar would be killed before it commits" $explicit $grace) }}
{{- end }}
{{- $explicit }}
{{- else }}
{{- $drain := $grace }}
{{- if not (kindIs "invalid" .Values.app.drainSeconds) }}
{{- $drain = int .Values.app.drainSeconds }}
{{- end }}
{{- $margin := int .Values.terminationGraceMarginSeconds }}
{{- if .Values.sidecar.native }}
{{- add $drain $grace $margin }}
{{- else }}
{{- add (max $drain $grace) $margin }}
{{- end }}
{{- end }}
{{- end }}

{{/* One kubelet gRPC probe of the health-only listener. Takes (dict "ctx" . "probe" P). */}}
{{- define "kafka-sidecar.sidecarProbe" -}}
grpc:
  port: {{ .ctx.Values.sidecar.health.port }}
  {{- with .ctx.Values.sidecar.probes.service }}
  service: {{ . | quote }}
  {{- end }}
{{ toYaml (omit .probe "enabled") }}
{{- end }}

{{- define "kafka-sidecar.container" -}}
{{- $s := .Values.sidecar }}
{{- if and $s.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.native needs Kubernetes 1.29+ (this is %s): set sidecar.native=false" .Capabilities.KubeVersion.Version) }}
{{- end -}}
- name: kafka-sidecar
  image: {{ include "kafka-sidecar.image" (dict "image" $s.image "tag" .Chart.AppVersion) | quote }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  {{- if $s.native }}
  # A native sidecar: starts before the app, stops after it.
  restartPolicy: Always
  {{- end }}
  args: [run, --config, /etc/kafka-sidecar/config.yaml]
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- with $s.authToken.existingSecret }}
    - name: KAFKA_SIDECAR_LISTEN__AUTH_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $s.authToken.key }}
    {{- end }}
    {{- with $s.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $s.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # No port for the consumer API: it listens on 127.0.0.1:{{ $s.grpc.port }} and the socket, inside the pod.
  ports:
    - name: sidecar-health
      containerPort: {{ $s.health.port }}
      protocol: TCP
    {{- if $s.metrics.enabled }}
    - name: sidecar-metrics
      containerPort: {{ $s.metrics.port }}
      protocol: TCP
    {{- end }}
  {{- if $s.probes.startup.enabled }}
  startupProbe:
    {{- include "kafka-sidecar.sidecarProbe" (dict "ctx" . "probe" $s.probes.startup) | nindent 4 }}
  {{- end }}
  {{- if $s.probes.readiness.enabled }}
  readinessProbe:
    {{- include "kafka-sidecar.sidecarProbe" (dict "ctx" . "probe" $s.probes.readiness) | nindent 4 }}
  {{- end }}
  {{- if $s.probes.liveness.enabled }}
  livenessProbe:
    {{- include "kafka-sidecar.sidecarProbe" (dict "ctx" . "probe" $s.probes.liveness) | nindent 4 }}
  {{- end }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: kafka-sidecar-config
      mountPath: /etc/kafka-sidecar
      readOnly: true
    - name: kafka-sidecar-socket
      mountPath: {{ $s.socketDir }}
    - name: kafka-sidecar-tmp
      mountPath: /tmp
    {{- with $s.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{- define "kafka-sidecar.volumes" -}}
- name: kafka-sidecar-config
  configMap:
    name: {{ include "kafka-sidecar.configMapName" . }}
- name: kafka-sidecar-socket
  emptyDir:
    sizeLimit: 1Mi
- name: kafka-sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "kafka-sidecar.appVolumeMounts" -}}
- name: kafka-sidecar-socket
  mountPath: {{ .Values.app.socketMountPath }}
{{- end }}

{{- define "kafka-sidecar.appEnv" -}}
- name: KAFKA_SIDECAR_TARGET
  value: {{ printf "unix://%s/%s" (trimSuffix "/" .Values.app.socketMountPath) .Values.sidecar.socketName | quote }}
- name: KAFKA_SIDECAR_TCP_TARGET
  value: {{ printf "127.0.0.1:%v" .Values.sidecar.grpc.port | quote }}
{{- with .Values.sidecar.authToken.existingSecret }}
- name: KAFKA_SIDECAR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.sidecar.authToken.key }}
{{- end }}
{{- end }}
