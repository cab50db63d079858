{{/* Chart name. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or fullnameOverride. */}}
{{- define "tandem.fullname" -}}
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

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the whole release. */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "tandem.componentSelectorLabels" -}}
{{ include "tandem.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret with the API key and cluster secret. */}}
{{- define "tandem.secretName" -}}
{{- default (printf "%s-secrets" (include "tandem.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/* The bundled etcd's name and client URL. */}}
{{- define "tandem.etcdName" -}}
{{- printf "%s-etcd" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* --etcd: the bundled member or the external endpoints. */}}
{{- define "tandem.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "http://%s.%s.svc:2379" (include "tandem.etcdName" .) .Release.Namespace }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled=false needs etcd.external.endpoints (a list of URLs)" }}
{{- end }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* Grace period of a role: (dict "root" $ "cfg" .Values.router "preStop" N). */}}
{{- define "tandem.gracePeriod" -}}
{{- $drain := int .root.Values.drainTimeoutSeconds }}
{{- $pre := int (default 0 .preStop) }}
{{- $grace := int (default (add $drain $pre 15) .cfg.terminationGracePeriodSeconds) }}
{{- if le $grace (add $drain $pre) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed drainTimeoutSeconds (%d) plus the preStop sleep (%d), or pods are killed mid-drain" $grace $drain $pre) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/* Flags every role shares. */}}
{{- define "tandem.commonArgs" -}}
- --host
- 0.0.0.0
- --advertise-host
- $(POD_IP)
- --node-id
- $(POD_NAME)
- --etcd
- {{ include "tandem.etcdEndpoints" . | quote }}
- --etcd-prefix
- {{ .Values.etcd.prefix | quote }}
- --etcd-lease-ttl-secs
- {{ .Values.etcd.leaseTtlSeconds | quote }}
- --drain-timeout-secs
- {{ .Values.drainTimeoutSeconds | quote }}
- --model
- {{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.file | quote }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
{{- $tls := .Values.etcd.external.tls }}
- --etcd-ca
- {{ printf "%s/%s" $tls.mountPath $tls.caFile | quote }}
{{- if and $tls.certFile $tls.keyFile }}
- --etcd-cert
- {{ printf "%s/%s" $tls.mountPath $tls.certFile | quote }}
- --etcd-key
- {{ printf "%s/%s" $tls.mountPath $tls.keyFile | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment every role shares. */}}
{{- define "tandem.commonEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: TANDEM_MODELS_DIR
  value: {{ .Values.model.mountPath | quote }}
- name: TANDEM_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: TANDEM_LOG
  value: {{ .Values.logLevel | quote }}
- name: TANDEM_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.secretName" . }}
      key: {{ .Values.secrets.clusterSecretKey }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.auth.existingSecret }}
- name: TANDEM_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.auth.existingSecret }}
      key: {{ .Values.etcd.external.auth.usernameKey }}
- name: TANDEM_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.auth.existingSecret }}
      key: {{ .Values.etcd.external.auth.passwordKey }}
{{- end }}
{{- end }}

{{/* Volumes every role shares. */}}
{{- define "tandem.volumes" -}}
- name: model
{{- $v := .Values.model.volume }}
{{- if eq $v.type "emptyDir" }}
  emptyDir:
    {{- toYaml (default dict $v.emptyDir) | nindent 4 }}
{{- else if eq $v.type "persistentVolumeClaim" }}
{{- if not $v.existingClaim }}
{{- fail "model.volume.type=persistentVolumeClaim needs model.volume.existingClaim" }}
{{- end }}
  persistentVolumeClaim:
    claimName: {{ $v.existingClaim }}
    readOnly: {{ not .Values.model.fetch.enabled }}
{{- else if eq $v.type "hostPath" }}
{{- if not $v.hostPath }}
{{- fail "model.volume.type=hostPath needs model.volume.hostPath" }}
{{- end }}
  hostPath:
    path: {{ $v.hostPath }}
    type: Directory
{{- else }}
{{- fail (printf "model.volume.type must be emptyDir, persistentVolumeClaim or hostPath, not %q" $v.type) }}
{{- end }}
{{- if and (eq $v.type "emptyDir") (not .Values.model.fetch.enabled) }}
{{- fail "model.volume.type=emptyDir starts empty: enable model.fetch or use a persistentVolumeClaim/hostPath with the weights" }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
{{- if not .Values.etcd.external.tls.secretName }}
{{- fail "etcd.external.tls.enabled needs etcd.external.tls.secretName" }}
{{- end }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* Mounts of the main containers. */}}
{{- define "tandem.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  mountPath: {{ .Values.etcd.external.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The init container that installs the default model. */}}
{{- define "tandem.fetchInitContainer" -}}
{{- if .Values.model.fetch.enabled }}
- name: fetch-model
  image: {{ include "tandem.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["model", "fetch", "--dir", {{ .Values.model.mountPath | quote }}]
  env:
    - name: HOME
      value: /tmp
    - name: PIP_NO_CACHE_DIR
      value: "1"
    {{- with .Values.model.fetch.pipIndexUrl }}
    - name: PIP_INDEX_URL
      value: {{ . | quote }}
    {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  {{- with .Values.model.fetch.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* HTTP probes on the node's port named "http". */}}
{{- define "tandem.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /ready
    port: http
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}

{{/* Prometheus scrape annotations: (dict "root" $ "port" N). */}}
{{- define "tandem.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
