{{/*
Chart name, overridable.
*/}}
{{- define "remem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (a DNS label). A release name that already
contains the chart name is used as it is.
*/}}
{{- define "remem.fullname" -}}
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
Name of one component's objects: fullname-component, at most 52 characters, because a
StatefulSet's and a DaemonSet's controller-revision-hash label appends 11 characters to it
and a label value is at most 63. Call with (dict "root" $ "component" "placement").
*/}}
{{- define "remem.componentName" -}}
{{- printf "%s-%s" (include "remem.fullname" .root | trunc 40 | trimSuffix "-") .component | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "remem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: what a controller and a Service select by.
*/}}
{{- define "remem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "remem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "remem.labels" -}}
helm.sh/chart: {{ include "remem.chart" . }}
{{ include "remem.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: remem
{{- end }}

{{/*
Selector labels of one component. Call with (dict "root" $ "component" "pageserver").
*/}}
{{- define "remem.componentSelectorLabels" -}}
{{ include "remem.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "remem.componentLabels" -}}
{{ include "remem.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
An image reference: repository:tag, the tag defaulting to the chart's appVersion.
Call with (dict "root" $ "image" .Values.placement.image).
*/}}
{{- define "remem.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/*
The placement Service's ZeroMQ endpoint, for page servers, clients and the admin tools.
*/}}
{{- define "remem.placementEndpoint" -}}
tcp://{{ include "remem.componentName" (dict "root" . "component" "placement") }}:{{ include "remem.port.placement" . }}
{{- end }}

{{/* Ports: the services' defaults (README), named so that probes and Services agree. */}}
{{- define "remem.port.placement" -}}7000{{- end }}
{{- define "remem.port.placementMetrics" -}}9103{{- end }}
{{- define "remem.port.pageserver" -}}7100{{- end }}
{{- define "remem.port.pageserverMetrics" -}}9101{{- end }}
{{- define "remem.port.clientMetrics" -}}9102{{- end }}
{{- define "remem.port.mirrorMetrics" -}}9103{{- end }}

{{/*
Where the key Secret is mounted in every pod.
*/}}
{{- define "remem.keysDir" -}}/etc/remem/keys{{- end }}

{{/*
A volume of the key Secret holding only the files a pod needs: its own secret key(s) at the
top, and under authorized/ the public certificates its server admits (--curve-authorized
reads every *.key there). Call with (dict "root" $ "name" "keys" "secrets" (list "placement")
"public" (list "x") "authorized" (list "y")); "name" defaults to keys.
*/}}
{{- define "remem.keysVolume" -}}
- name: {{ .name | default "keys" }}
  secret:
    secretName: {{ required "curve.existingSecret: name the Secret of remem keys" .root.Values.curve.existingSecret }}
    # Secret keys: readable by their owner (root) and the pod's fsGroup only.
    defaultMode: 0440
    items:
      {{- range .secrets }}
      - key: {{ . }}.key_secret
        path: {{ . }}.key_secret
      {{- end }}
      {{- range .public }}
      - key: {{ . }}.key
        path: {{ . }}.key
      {{- end }}
      {{- range .authorized }}
      - key: {{ . }}.key
        path: authorized/{{ . }}.key
      {{- end }}
{{- end }}

{{/*
Extra REMEM_* variables from a values map, as env entries (values quoted: env is strings).
*/}}
{{- define "remem.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
Hardening shared by the containers that need no privilege.
*/}}
{{- define "remem.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}
