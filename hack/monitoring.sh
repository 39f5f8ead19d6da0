#!/usr/bin/env bash
# The local cluster's metrics pipeline, which the HPAs of autoscaled InferenceModels read:
#
#   Prometheus                (hack/build_tools.py prometheus: Debian's has no Kubernetes discovery)
#                             on 127.0.0.1:$prometheus_port; finds the routers' pods through the API
#                             server (kubernetes_sd, role endpoints) and scrapes their /metrics,
#                             as the chart's ServiceMonitor asks (port http, honor_labels)
#   prometheus-adapter        (hack/build_tools.py prometheus-adapter) on $bridge_address:$adapter_port,
#                             with the chart's rules (charts/modelfleet/files/adapter-rules.yaml),
#                             registered as the APIService v1beta1.external.metrics.k8s.io
#                             (hack/cluster/monitoring.yaml)
#
#   hack/monitoring.sh start [prometheus|adapter]   start both (hack/cluster.sh up calls this), or one
#   hack/monitoring.sh stop [prometheus|adapter]    stop both (hack/cluster.sh down), or one: the
#                                                   metric goes missing, as when either is down for real
#   hack/monitoring.sh status                       exit 0 if both run and the APIService is Available
#
# Both are host processes, as the registry and CoreDNS are: the pipeline is the one a cluster runs
# (an APIService in front of an adapter in front of a Prometheus that scrapes pods), without images
# of Prometheus or the adapter, which cannot be pulled here. Everything lives in .cache/monitoring/.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
cache_dir="$repo_root/.cache"
bin_dir="$cache_dir/bin"
kubeconfig="$cache_dir/kubeconfig"
monitoring_dir="$cache_dir/monitoring"
pki_dir="$cache_dir/kwok/clusters/modelfleet-dev/pki"
prometheus_url="http://127.0.0.1:$prometheus_port"
# How often Prometheus scrapes the routers: the HPA controller looks every 15 s, so a queue shows
# up in its next look.
scrape_interval=5s

log() { printf 'monitoring: %s\n' "$*" >&2; }
die() { printf 'monitoring: error: %s\n' "$*" >&2; exit 1; }

kubectl_() { "$bin_dir/kubectl" --kubeconfig "$kubeconfig" "$@"; }

state_dir=$monitoring_dir
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$repo_root/hack/lib.sh"

write_prometheus_config() {
  cat >"$monitoring_dir/prometheus.yml" <<EOF
global:
  scrape_interval: $scrape_interval
  evaluation_interval: $scrape_interval
scrape_configs:
  # The chart's ServiceMonitor, as the Prometheus Operator would write it: the endpoints of every
  # ModelFleet router Service, port http, path /metrics, honor_labels (the router's \`namespace\`
  # label is the InferenceModel's, which the adapter matches against the HPA's namespace).
  - job_name: modelfleet-routers
    honor_labels: true
    metrics_path: /metrics
    kubernetes_sd_configs:
      - role: endpoints
        kubeconfig_file: $kubeconfig
    relabel_configs:
      - source_labels:
          - __meta_kubernetes_service_label_app_kubernetes_io_part_of
          - __meta_kubernetes_service_label_app_kubernetes_io_component
          - __meta_kubernetes_endpoint_port_name
        regex: modelfleet;router;http
        action: keep
      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
      - {source_labels: [__meta_kubernetes_service_name], target_label: service}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
  # The chart's PodMonitor: vLLM's own metrics from the operator's model pods (containers named
  # vllm), with the namespace and pod labels that the adapter's Pods metric matches.
  - job_name: modelfleet-vllm
    metrics_path: /metrics
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: $kubeconfig
    relabel_configs:
      - source_labels:
          - __meta_kubernetes_pod_label_app_kubernetes_io_managed_by
          - __meta_kubernetes_pod_label_app_kubernetes_io_component
          - __meta_kubernetes_pod_container_name
          - __meta_kubernetes_pod_container_port_name
        regex: modelfleet-operator;model-server;vllm;http
        action: keep
      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
EOF
}

# The adapter's serving certificate, for the name the API server dials, signed by the cluster's CA
# (which the APIService's caBundle names).
write_adapter_certificate() {
  [[ -f "$pki_dir/ca.crt" && -f "$pki_dir/ca.key" ]] || die "no cluster CA in $pki_dir (hack/cluster.sh up)"
  local name=prometheus-adapter.monitoring.svc
  openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$monitoring_dir/adapter.key" \
    -out "$monitoring_dir/adapter.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:prometheus-adapter.monitoring,IP:%s\n' "$name" "$bridge_address" \
    >"$monitoring_dir/adapter.ext"
  openssl x509 -req -in "$monitoring_dir/adapter.csr" -CA "$pki_dir/ca.crt" -CAkey "$pki_dir/ca.key" \
    -CAcreateserial -CAserial "$monitoring_dir/ca.srl" -days 30 -extfile "$monitoring_dir/adapter.ext" \
    -out "$monitoring_dir/adapter.crt" 2>/dev/null
}

apiservice_available() {
  kubectl_ get apiservice v1beta1.external.metrics.k8s.io \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null | grep -qx True
}

start_prometheus() {
  pid_alive prometheus && return 0
  python3 "$repo_root/hack/build_tools.py" prometheus >/dev/null
  write_prometheus_config
  # A fresh TSDB each time: the series of an earlier cluster mean nothing in this one.
  rm -rf "$monitoring_dir/prometheus-data"
  start_process prometheus "$bin_dir/prometheus" --config.file="$monitoring_dir/prometheus.yml" \
    --storage.tsdb.path="$monitoring_dir/prometheus-data" --storage.tsdb.retention.time=1d \
    --web.listen-address="127.0.0.1:$prometheus_port" --web.enable-lifecycle
  wait_for "Prometheus answering at $prometheus_url" 60 curl -fsS "$prometheus_url/-/ready"
}

start_adapter() {
  python3 "$repo_root/hack/build_tools.py" prometheus-adapter >/dev/null
  # A certificate of an earlier cluster (its CA gone with it, say after a reboot) or one about to
  # expire is made again: the API server would refuse the adapter as an unknown authority.
  if ! openssl verify -CAfile "$pki_dir/ca.crt" "$monitoring_dir/adapter.crt" >/dev/null 2>&1 ||
    ! openssl x509 -checkend 86400 -noout -in "$monitoring_dir/adapter.crt" >/dev/null 2>&1; then
    write_adapter_certificate
  fi
  # The API server authenticates itself with its proxy client certificate and names the caller in
  # X-Remote-* headers (--requestheader-* in hack/cluster/kwokctl.yaml); the adapter reads that
  # setup from kube-system/extension-apiserver-authentication and asks the API server, with a
  # SubjectAccessReview, whether the caller may read the metric.
  start_process adapter "$bin_dir/prometheus-adapter" \
    --secure-port="$adapter_port" --bind-address="$bridge_address" \
    --tls-cert-file="$monitoring_dir/adapter.crt" --tls-private-key-file="$monitoring_dir/adapter.key" \
    --lister-kubeconfig="$kubeconfig" --authentication-kubeconfig="$kubeconfig" \
    --authorization-kubeconfig="$kubeconfig" \
    --prometheus-url="$prometheus_url/" \
    --config="$repo_root/charts/modelfleet/files/adapter-rules.yaml" \
    --metrics-relist-interval=30s --v=2
  sed -e "s|@BRIDGE_ADDRESS@|$bridge_address|g" -e "s|@ADAPTER_PORT@|$adapter_port|g" \
    -e "s|@CA_BUNDLE@|$(base64 -w0 <"$pki_dir/ca.crt")|g" "$repo_root/hack/cluster/monitoring.yaml" |
    kubectl_ apply -f - >/dev/null
  wait_for "the APIService v1beta1.external.metrics.k8s.io Available" 90 apiservice_available
}

start() {
  [[ -f "$kubeconfig" ]] || die "the cluster is not up (hack/cluster.sh up)"
  mkdir -p "$monitoring_dir"
  case "${1:-all}" in
    prometheus) start_prometheus ;;
    adapter) start_adapter ;;
    all) start_prometheus && start_adapter ;;
    *) die "usage: $0 start [prometheus|adapter]" ;;
  esac
  log "Prometheus at $prometheus_url (scrapes every $scrape_interval), external metrics at $bridge_address:$adapter_port"
}

stop() {
  case "${1:-all}" in
    prometheus) stop_process prometheus ;;
    adapter) stop_process adapter ;;
    all)
      stop_process adapter
      stop_process prometheus
      # The certificate belongs to this cluster's CA; a new cluster gets a new one.
      rm -f "$monitoring_dir/adapter.crt" "$monitoring_dir/adapter.key"
      ;;
    *) die "usage: $0 stop [prometheus|adapter]" ;;
  esac
}

status() {
  pid_alive prometheus && pid_alive adapter && curl -fsS -o /dev/null --max-time 2 "$prometheus_url/-/ready" &&
    apiservice_available
}

case "${1:-}" in
  start) start "${2:-all}" ;;
  stop) stop "${2:-all}" ;;
  status) if status; then log "running; external metrics available"; else log "not running"; exit 1; fi ;;
  *) die "usage: $0 start|stop [prometheus|adapter] | status" ;;
esac
