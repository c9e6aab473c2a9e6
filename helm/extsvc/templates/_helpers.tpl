{{/* Names and labels shared by every template. */}}

{{- define "extsvc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "extsvc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; "component" is server, controller or crds. */}}
{{- define "extsvc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "extsvc.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: extsvc
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels a selector matches on (never change between upgrades). */}}
{{- define "extsvc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "extsvc.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "extsvc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "extsvc.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "extsvc.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{/* Pod and container security contexts: non-root, read-only root filesystem, no privileges. */}}
{{- define "extsvc.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "extsvc.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The policy file as the server reads it: config.file with the Redis store and the mounted
     rate-limit domain files filled in. */}}
{{- define "extsvc.policyFile" -}}
{{- $file := deepCopy .Values.config.file -}}
{{- $domains := .Values.config.ratelimitDomains -}}
{{- if or $domains .Values.redis.enabled -}}
{{- $rl := deepCopy (default dict (get $file "ratelimit")) -}}
{{- if and $domains (not (hasKey $rl "config_dir")) (not (hasKey $rl "files")) -}}
{{- $_ := set $rl "config_dir" "/etc/extsvc/ratelimit" -}}
{{- end -}}
{{- if not (or (hasKey $rl "config_dir") (hasKey $rl "files")) -}}
{{- fail "redis.enabled: the rate-limit service needs domain files: set config.ratelimitDomains (or config.file.ratelimit.config_dir / files)" -}}
{{- end -}}
{{- if .Values.redis.enabled -}}
{{- $store := deepCopy (default dict (get $rl "store")) -}}
{{- $_ := set $store "type" .Values.redis.type -}}
{{- if eq .Values.redis.type "redis-cluster" -}}
{{- if not .Values.redis.urls -}}
{{- fail "redis.urls: redis-cluster needs at least one seed node" -}}
{{- end -}}
{{- $_ := set $store "urls" .Values.redis.urls -}}
{{- else -}}
{{- $_ := set $store "url" .Values.redis.url -}}
{{- end -}}
{{- if or .Values.redis.password .Values.redis.existingSecret -}}
{{- $_ := set $store "password_file" "/etc/extsvc/redis/password" -}}
{{- end -}}
{{- $_ := set $rl "store" $store -}}
{{- end -}}
{{- $_ := set $file "ratelimit" $rl -}}
{{- end -}}
{{- toYaml $file -}}
{{- end -}}

{{- define "extsvc.redisSecretName" -}}
{{- default (printf "%s-redis" (include "extsvc.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}
