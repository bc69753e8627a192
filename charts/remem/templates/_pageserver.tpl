{{/*
The page server's pod template, shared by its StatefulSet and its DaemonSet.
*/}}
{{- define "remem.pageserver.arenaMiB" -}}
{{- /* capacity + 48 bytes of slot per 4 KiB page (3/256 of it) + 1 MiB of header */ -}}
{{- $cap := int .Values.pageserver.capacityMiB }}
{{- add $cap (div (add (mul $cap 3) 255) 256) 1 }}
{{- end }}

{{- define "remem.pageserver.podTemplate" -}}
{{- $component := dict "root" . "component" "pageserver" }}
{{- $p := .Values.pageserver }}
{{- $memory := add (include "remem.pageserver.arenaMiB" . | int) (int $p.memoryOverheadMiB) -}}
metadata:
  labels:
    {{- include "remem.componentLabels" $component | nindent 4 }}
spec:
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # The preStop drain first, then the page server's own SIGTERM drain.
  terminationGracePeriodSeconds: {{ add (int $p.drainSeconds) 30 }}
  # The images' own user, uid 10001 (it owns their /var/lib/remem), and its group for
  # the Secret's files.
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: pageserver
      image: {{ include "remem.image" (dict "root" . "image" $p.image) | quote }}
      imagePullPolicy: {{ .Values.imagePullPolicy }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_UID
          valueFrom:
            fieldRef:
              fieldPath: metadata.uid
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: REMEM_PAGESERVER_CAPACITY
          value: "{{ $p.capacityMiB }}MiB"
        - name: REMEM_PAGESERVER_LISTEN
          value: "tcp://0.0.0.0:{{ include "remem.port.pageserver" . }}"
        # Clients and pushing page servers dial the pod's IP (IPv4: libzmq would need an
        # IPv6 address in brackets).
        - name: REMEM_PAGESERVER_ADVERTISE
          value: "tcp://$(POD_IP):{{ include "remem.port.pageserver" . }}"
        # Bound to the pod IP because placement scrapes the URL the page server registers,
        # which is built from this address (0.0.0.0 would register the pod's host name,
        # which other pods cannot resolve).
        - name: REMEM_PAGESERVER_METRICS_HOST
          value: "$(POD_IP)"
        - name: REMEM_PAGESERVER_METRICS_PORT
          value: {{ include "remem.port.pageserverMetrics" . | quote }}
        - name: REMEM_PAGESERVER_ZONE
          {{- if eq $p.zone "nodeName" }}
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
          {{- else if eq $p.zone "topologyLabel" }}
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['topology.kubernetes.io/zone']
          {{- else }}
          value: {{ $p.zone | quote }}
          {{- end }}
        # One id per pod: the arena (an emptyDir) lives exactly as long as the pod, so a
        # restarted container keeps its id and its pages, and a new pod is a new server.
        - name: REMEM_PAGESERVER_SERVER_ID
          value: "$(POD_NAME).$(POD_UID)"
        - name: REMEM_PAGESERVER_SHM_PATH
          value: /dev/shm/remem-pageserver.arena
        - name: REMEM_PAGESERVER_PLACEMENT
          value: {{ include "remem.placementEndpoint" . | quote }}
        - name: REMEM_PAGESERVER_PLACEMENT_PUBLIC_KEY
          value: {{ include "remem.keysDir" . }}/placement.key
        - name: REMEM_PAGESERVER_CURVE_SECRET_KEY
          value: {{ include "remem.keysDir" . }}/pageserver.key_secret
        - name: REMEM_PAGESERVER_CURVE_AUTHORIZED
          value: {{ include "remem.keysDir" . }}/authorized
        # For `remem drain` in preStop (an admin key: page server keys may not drain).
        - name: REMEM_PLACEMENT_ENDPOINT
          value: {{ include "remem.placementEndpoint" . | quote }}
        - name: REMEM_ADMIN_CURVE_SECRET_KEY
          value: {{ include "remem.keysDir" . }}/admin.key_secret
        - name: REMEM_ADMIN_PLACEMENT_PUBLIC_KEY
          value: {{ include "remem.keysDir" . }}/placement.key
        {{- with $p.env }}
        {{- include "remem.extraEnv" . | trim | nindent 8 }}
        {{- end }}
      ports:
        - name: zmq
          containerPort: {{ include "remem.port.pageserver" . }}
          protocol: TCP
        - name: metrics
          containerPort: {{ include "remem.port.pageserverMetrics" . }}
          protocol: TCP
      # /metrics, not the CurveZMQ port: a bare TCP connect counts as a refused handshake.
      readinessProbe:
        httpGet:
          path: /metrics
          port: metrics
        periodSeconds: 10
      livenessProbe:
        httpGet:
          path: /metrics
          port: metrics
        periodSeconds: 20
        failureThreshold: 6
      lifecycle:
        preStop:
          exec:
            # Placement copies every slab of this server to the others and drops it here;
            # the exit status is only logged, the pod stops either way.
            command:
              - sh
              - -c
              - exec remem drain "$REMEM_PAGESERVER_SERVER_ID" --deadline {{ $p.drainSeconds }}
      resources:
        requests:
          cpu: {{ $p.cpu | quote }}
          memory: {{ $memory }}Mi
        limits:
          memory: {{ $memory }}Mi
      securityContext:
        {{- include "remem.restrictedSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: arena
          mountPath: /dev/shm
        - name: keys
          mountPath: {{ include "remem.keysDir" . }}
          readOnly: true
  volumes:
    - name: arena
      emptyDir:
        medium: Memory
        sizeLimit: {{ include "remem.pageserver.arenaMiB" . }}Mi
    {{- include "remem.keysVolume" (dict "root" . "secrets" (list "pageserver" "admin") "public" (list "placement") "authorized" (list "client" "placement" "pageserver")) | nindent 4 }}
  {{- with $p.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $p.kind "StatefulSet" }}
  # Two page servers on one node would share its RAM and its failure.
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "remem.componentSelectorLabels" $component | nindent 14 }}
  {{- end }}
  {{- with $p.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
