{{/* Names, labels and shared pod pieces for every component. */}}

{{- define "mtacluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mtacluster.fullname" -}}
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

{{- define "mtacluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "mtacluster.labels" -}}
helm.sh/chart: {{ include "mtacluster.chart" . }}
{{ include "mtacluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mtacluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mtacluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: include with (dict "ctx" $ "component" "frontend"). */}}
{{- define "mtacluster.componentLabels" -}}
{{ include "mtacluster.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mtacluster.componentSelectorLabels" -}}
{{ include "mtacluster.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mtacluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mtacluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mtacluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mtacluster.clusterKeysSecret" -}}
{{- default (printf "%s-cluster-keys" (include "mtacluster.fullname" .)) .Values.clusterKeys.existingSecret }}
{{- end }}

{{- define "mtacluster.tlsSecret" -}}
{{- default (printf "%s-tls" (include "mtacluster.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "mtacluster.tlsEnabled" -}}
{{- if or .Values.tls.existingSecret .Values.tls.certificate }}true{{ end }}
{{- end }}

{{/* The frontend listeners that are on: SMTP when asked for; submission(s) when asked for and TLS is set. */}}
{{- define "mtacluster.smtpListener" -}}
{{- if .Values.frontend.listeners.smtp }}true{{ end }}
{{- end }}

{{- define "mtacluster.submissionListener" -}}
{{- if and .Values.frontend.listeners.submission (include "mtacluster.tlsEnabled" .) }}true{{ end }}
{{- end }}

{{- define "mtacluster.submissionsListener" -}}
{{- if and .Values.frontend.listeners.submissions (include "mtacluster.tlsEnabled" .) }}true{{ end }}
{{- end }}

{{- define "mtacluster.usersSecret" -}}
{{- default (printf "%s-users" (include "mtacluster.fullname" .)) .Values.users.existingSecret }}
{{- end }}

{{- define "mtacluster.usersEnabled" -}}
{{- if or .Values.users.existingSecret .Values.users.file }}true{{ end }}
{{- end }}

{{- define "mtacluster.queueHeadless" -}}
{{- printf "%s-queue-headless" (include "mtacluster.fullname" .) }}
{{- end }}

{{/* The bus endpoint of every shard: one per StatefulSet replica, in ordinal order (= shard number). */}}
{{- define "mtacluster.shardEndpoints" -}}
{{- $fullname := include "mtacluster.fullname" . }}
{{- $headless := include "mtacluster.queueHeadless" . }}
{{- $endpoints := list }}
{{- range $i := until (int .Values.queue.replicas) }}
{{- $endpoints = append $endpoints (printf "tcp://%s-queue-%d.%s.%s.svc:%d" $fullname $i $headless $.Release.Namespace (int $.Values.queue.busPort)) }}
{{- end }}
{{- toJson $endpoints }}
{{- end }}

{{- define "mtacluster.mailboxHeadless" -}}
{{- printf "%s-mailbox-headless" (include "mtacluster.fullname" .) }}
{{- end }}

{{/* The LMTP endpoint of every mailbox node: one per StatefulSet replica, in ordinal order (= node number). */}}
{{- define "mtacluster.mailboxNodes" -}}
{{- $fullname := include "mtacluster.fullname" . }}
{{- $headless := include "mtacluster.mailboxHeadless" . }}
{{- $nodes := list }}
{{- range $i := until (int .Values.mailbox.replicas) }}
{{- $nodes = append $nodes (printf "%s-mailbox-%d.%s.%s.svc:%d" $fullname $i $headless $.Release.Namespace (int $.Values.mailbox.lmtpPort)) }}
{{- end }}
{{- toJson $nodes }}
{{- end }}

{{/* The Secret with the mailbox nodes' certificate: mailbox.tls.existingSecret, else the chart's `tls` one. */}}
{{- define "mtacluster.mailboxTlsSecret" -}}
{{- if .Values.mailbox.tls.existingSecret }}
{{- .Values.mailbox.tls.existingSecret }}
{{- else if include "mtacluster.tlsEnabled" . }}
{{- include "mtacluster.tlsSecret" . }}
{{- else }}
{{- fail "mailbox.enabled needs a TLS certificate (POP3 passwords and LMTP between pods are encrypted): set mailbox.tls.existingSecret, or tls.existingSecret / tls.certificate" }}
{{- end }}
{{- end }}

{{/* One TOML value: string, whole or fractional number, boolean, list or table of strings. */}}
{{- define "mtacluster.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}{{ toJson $v }}
{{- else if kindIs "bool" $v }}{{ ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- if eq (float64 $v) (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}[{{ range $i, $item := $v }}{{ if $i }}, {{ end }}{{ include "mtacluster.tomlValue" $item }}{{ end }}]
{{- else if kindIs "map" $v }}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }}, {{ end }}{{ toJson $k }} = {{ include "mtacluster.tomlValue" (get $v $k) }}{{ end -}} }
{{- else }}{{ fail (printf "config: cannot write %v (%s) as TOML" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* The whole configuration file: values.config plus the keys the chart owns. */}}
{{- define "mtacluster.configToml" -}}
{{- $config := deepCopy .Values.config }}
{{- $listen := list }}
{{- if include "mtacluster.smtpListener" . }}
{{- $listen = list (printf "0.0.0.0:%d" (int .Values.frontend.smtpPort)) }}
{{- end }}
{{- $submission := list }}
{{- if include "mtacluster.submissionListener" . }}
{{- $submission = list (printf "0.0.0.0:%d" (int .Values.frontend.submissionPort)) }}
{{- end }}
{{- $submissions := list }}
{{- if include "mtacluster.submissionsListener" . }}
{{- $submissions = list (printf "0.0.0.0:%d" (int .Values.frontend.submissionsPort)) }}
{{- end }}
{{- if not (or $listen $submission $submissions) }}
{{- fail "frontend.listeners: turn on at least one listener (submission and submissions also need tls)" }}
{{- end }}
{{- $smtp := mergeOverwrite (default dict $config.smtp) (dict
      "listen" $listen
      "submission_listen" $submission
      "submissions_listen" $submissions
      "proxy_protocol" .Values.frontend.service.proxyProtocol
      "shutdown_grace" (printf "%ds" (int .Values.frontend.shutdownGrace))) }}
{{- if include "mtacluster.tlsEnabled" . }}
{{- $smtp = mergeOverwrite $smtp (dict
      "tls_cert_file" "/etc/mtacluster/tls/tls.crt"
      "tls_key_file" "/etc/mtacluster/tls/tls.key") }}
{{- end }}
{{- $auth := deepCopy (default dict $config.auth) }}
{{- if include "mtacluster.usersEnabled" . }}
{{- $auth = mergeOverwrite $auth (dict "users_file" "/etc/mtacluster/users/users") }}
{{- end }}
{{- $queue := mergeOverwrite (default dict $config.queue) (dict
      "shards" (include "mtacluster.shardEndpoints" . | fromJsonArray)
      "spool_dir" "/var/lib/mtacluster/spool") }}
{{- $metrics := dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) "top_domains" .Values.metrics.topDomains }}
{{- $bus := mergeOverwrite (default dict $config.bus) (dict "curve_key_file" "/etc/mtacluster/keys/curve.key") }}
{{- $sections := dict "smtp" $smtp "queue" $queue "delivery" (default dict $config.delivery) "metrics" $metrics "bus" $bus "auth" $auth "limits" (default dict $config.limits) "dns" (default dict $config.dns) }}
{{- $names := list "smtp" "queue" "delivery" "metrics" "bus" "auth" "limits" "dns" }}
{{- if .Values.mailbox.enabled }}
{{- $mailbox := mergeOverwrite (default dict $config.mailbox) (dict
      "maildir_root" "/var/lib/mtacluster/maildir"
      "nodes" (include "mtacluster.mailboxNodes" . | fromJsonArray)
      "lmtp_listen" (list (printf "0.0.0.0:%d" (int .Values.mailbox.lmtpPort)))
      "pop3_listen" (list (printf "0.0.0.0:%d" (int .Values.mailbox.pop3Port)))
      "pop3s_listen" (list (printf "0.0.0.0:%d" (int .Values.mailbox.pop3sPort)))
      "tls_cert_file" "/etc/mtacluster/mailbox-tls/tls.crt"
      "tls_key_file" "/etc/mtacluster/mailbox-tls/tls.key") }}
{{- if .Values.mailbox.tls.verifyNodes }}
{{- $mailbox = mergeOverwrite $mailbox (dict "node_ca_file" "/etc/mtacluster/mailbox-tls/ca.crt") }}
{{- end }}
{{- $sections = set $sections "mailbox" $mailbox }}
{{- $names = append $names "mailbox" }}
{{- end }}
# Generated by the mtacluster Helm chart from its values; see cluster/config.py for every key.
{{- range $name := $names }}
{{- $section := get $sections $name }}

[{{ $name }}]
{{- range $key := keys $section | sortAlpha }}
{{ $key }} = {{ include "mtacluster.tomlValue" (get $section $key) }}
{{- end }}
{{- end }}
{{- $aliases := default dict $config.aliases }}

[aliases]
{{- range $alias := keys $aliases | sortAlpha }}
{{ toJson $alias }} = {{ include "mtacluster.tomlValue" (get $aliases $alias) }}
{{- end }}
{{- end }}

{{/* Volumes every pod mounts: config, cluster keys, /tmp. */}}
{{- define "mtacluster.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "mtacluster.fullname" . }}-config
- name: cluster-keys
  secret:
    secretName: {{ include "mtacluster.clusterKeysSecret" . }}
    defaultMode: 0440
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end }}

{{- define "mtacluster.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/mtacluster/mtacluster.toml
  subPath: mtacluster.toml
  readOnly: true
- name: cluster-keys
  mountPath: /etc/mtacluster/keys
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Probes on the metrics port: /healthz (alive) and /readyz (ready for traffic). */}}
{{- define "mtacluster.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  timeoutSeconds: 5
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  timeoutSeconds: 5
{{- end }}

{{/* Pod-level settings shared by every component. */}}
{{- define "mtacluster.podSpecCommon" -}}
serviceAccountName: {{ include "mtacluster.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Annotations that roll pods when the configuration or the keys change. */}}
{{- define "mtacluster.podAnnotations" -}}
checksum/config: {{ include "mtacluster.configToml" . | sha256sum }}
checksum/cluster-keys: {{ .Values.clusterKeys | toJson | sha256sum }}
{{- end }}
