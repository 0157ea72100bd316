{{/* Names and labels. */}}
{{- define "gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gateway.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gateway.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/*
gateway.toml from a map: the values under gateway.config, key for key. Scalars and lists are
written first, then each sub-map as a [table]; maps inside lists become inline tables.
Integral numbers are written as integers (Helm reads every YAML number as a float).
*/}}
{{- define "gateway.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ . | toJson }}{{- end -}}
{{- end -}}

{{- define "gateway.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ $v | toJson }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if eq (float64 $v) (floor $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if kindIs "slice" $v -}}
[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "gateway.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}
{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "gateway.toml.key" $k }} = {{ include "gateway.toml.value" (get $v $k) }}{{ end }} }
{{- else -}}
{{- fail (printf "gateway.config: cannot write %v (%s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{- define "gateway.toml.table" -}}
{{- $path := .path -}}
{{- $m := .map -}}
{{- range $k := keys $m | sortAlpha }}
{{- $v := get $m $k }}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "gateway.toml.key" $k }} = {{ include "gateway.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $m | sortAlpha }}
{{- $v := get $m $k }}
{{- if kindIs "map" $v }}
{{- $p := include "gateway.toml.key" $k }}
{{- if $path }}{{ $p = printf "%s.%s" $path $p }}{{ end }}

[{{ $p }}]
{{- include "gateway.toml.table" (dict "path" $p "map" $v) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The ports the config listens on, for the container and the Service. */}}
{{- define "gateway.port.http" -}}
{{- $r := .Values.gateway.config.router -}}
{{- if $r.listener_port -}}{{ int64 $r.listener_port }}
{{- else -}}{{ regexFind "[0-9]+$" (first $r.listen) }}
{{- end -}}
{{- end -}}

{{- define "gateway.port.admin" -}}
{{- $a := .Values.gateway.config.admin | default dict -}}
{{- regexFind "[0-9]+$" ($a.listen | default "127.0.0.1:9901") -}}
{{- end -}}
