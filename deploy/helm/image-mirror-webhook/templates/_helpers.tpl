{{/* Labels Helm adds to every object: the chart and its manager. */}}
{{- define "imw.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels of the webhook's own objects (deploy/base's), and Helm's. */}}
{{- define "imw.labels" -}}
app.kubernetes.io/name: image-mirror-webhook
app.kubernetes.io/part-of: image-mirror-webhook
{{ include "imw.helmLabels" . }}
{{- end }}

{{/* The ServiceAccount as a subject of a binding. */}}
{{- define "imw.subject" -}}
- kind: ServiceAccount
  name: image-mirror-webhook
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/* The table: given inline, or the flavour's shipped one. */}}
{{- define "imw.table" -}}
{{- if .Values.config.table -}}
{{ .Values.config.table }}
{{- else -}}
{{ .Files.Get (printf "files/%s.yaml" .Values.mirror) }}
{{- end -}}
{{- end }}

{{/*
The table's ConfigMap name. Like kustomize's configMapGenerator, it carries a hash of the
content, so that a new table rolls the Deployment. It is kustomize's very hash, so the chart and
the overlays name the same object: sha256 of the JSON of data, kind and name, its first ten hex
digits with 0,1,3,a,e spelled g,h,k,m,t. The name in that JSON is empty, as kustomize's
(its hasher looks "metadata/name" up as one key and finds nothing).
*/}}
{{- define "imw.configMapName" -}}
{{- if .Values.config.existingConfigMap -}}
{{ .Values.config.existingConfigMap }}
{{- else -}}
{{- $data := dict "config.yaml" (include "imw.table" .) -}}
{{- $hash := dict "data" $data "kind" "ConfigMap" "name" "" | toJson | sha256sum | trunc 10 -}}
image-mirror-config-{{ $hash | replace "0" "g" | replace "1" "h" | replace "3" "k" | replace "a" "m" | replace "e" "t" }}
{{- end -}}
{{- end }}

{{- define "imw.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{ .Values.image.repository }}:{{ $tag }}{{ with .Values.image.digest }}@{{ . }}{{ end }}
{{- end }}
