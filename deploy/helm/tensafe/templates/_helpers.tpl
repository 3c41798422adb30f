{{/*
The six services and what the chart must know about each, stated once:
  image:  light (no torch) or ml
  state:  stateless   - all state in PostgreSQL; any number of replicas, HPA allowed (accountant: its
                        budget updates are compare-and-swap in the database)
          singleton   - one process per deployment: the vault (in-process quota lock, blobs on its volume)
                        and the ledger (the single writer of the Merkle log keeps its right edge in memory)
          in-memory   - holds tenants' live state in memory (trainer: training sessions; he: computations;
                        inference: loaded adapters): one replica, or several with sticky routing
  calls:  the peers it calls (TENSAFE_<PEER>_ENDPOINT is set for exactly these, and the NetworkPolicies
          open exactly these edges). Every service writes audit entries to the ledger; the ledger's own
          entries go over loopback. tests/deploy/test_helm.py checks this table against the code.
*/}}
{{- define "tensafe.topology" -}}
trainer:    {image: ml,    state: in-memory, grpc: TrainerService,    calls: [vault, accountant, ledger]}
accountant: {image: light, state: stateless, grpc: AccountantService, calls: [ledger]}
he:         {image: ml,    state: in-memory, grpc: HeService,         calls: [vault, ledger]}
vault:      {image: light, state: singleton, grpc: VaultService,      calls: [ledger]}
ledger:     {image: light, state: singleton, grpc: LedgerService,     calls: []}
inference:  {image: ml,    state: in-memory, grpc: InferenceService,  calls: [vault, ledger]}
{{- end -}}

{{- define "tensafe.order" -}}trainer accountant he vault ledger inference{{- end -}}

{{- define "tensafe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tensafe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tensafe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "tensafe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensafe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tensafe.labels" -}}
{{ include "tensafe.selectorLabels" . }}
helm.sh/chart: {{ include "tensafe.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tensafe
{{- end -}}

{{/* Selector labels of one service's pods: (dict "root" $ "service" "vault") */}}
{{- define "tensafe.componentSelector" -}}
{{ include "tensafe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "tensafe.serviceName" -}}
{{- printf "%s-%s" (include "tensafe.fullname" .root) .service -}}
{{- end -}}

{{/* host:port a peer is called at, in the release's namespace. */}}
{{- define "tensafe.endpoint" -}}
{{- $suffix := .root.Values.peerHostSuffix | default (printf ".%s.svc" .root.Release.Namespace) -}}
{{- printf "%s%s:%d" (include "tensafe.serviceName" .) $suffix (int .root.Values.port) -}}
{{- end -}}

{{- define "tensafe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tensafe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* How many replicas a service runs with; refuses counts its state cannot take (the schema says the same). */}}
{{- define "tensafe.replicas" -}}
{{- $svc := .svc -}}
{{- $state := .state -}}
{{- $replicas := int $svc.replicas -}}
{{- if and (eq $state "singleton") (gt $replicas 1) -}}
{{- fail (printf "services.%s.replicas=%d: the %s is one process per deployment (%s); it cannot run more than 1 replica" .service $replicas .service (ternary "the single writer of the Merkle log" "in-process quota lock, blobs on its own volume" (eq .service "ledger"))) -}}
{{- end -}}
{{- if and (eq $state "in-memory") (gt $replicas 1) (ne (default "single" $svc.routing) "sticky") -}}
{{- fail (printf "services.%s.replicas=%d: the %s keeps tenants' state in memory; more than 1 replica needs services.%s.routing=sticky (requests for one session must reach the replica holding it: see the chart README)" .service $replicas .service .service) -}}
{{- end -}}
{{- if and (ne $state "stateless") $svc.autoscaling (get (default dict $svc.autoscaling) "enabled") -}}
{{- fail (printf "services.%s.autoscaling: only stateless services (accountant) may autoscale; the %s holds state a scale-down would lose" .service .service) -}}
{{- end -}}
{{- $replicas -}}
{{- end -}}
