#!/usr/bin/env bash
# The local cluster's ingress controller: Traefik (hack/build_tools.py traefik), watching Ingresses
# of the IngressClass "traefik" through the API server and proxying to their Services' ready pods.
#
#   hack/ingress.sh start     start it (hack/cluster.sh up calls this)
#   hack/ingress.sh stop      stop it (hack/cluster.sh down)
#   hack/ingress.sh status    exit 0 if it runs and answers its ping
#
# HTTP on $bridge_address:$ingress_port, where a load balancer would send clients; its ping on
# loopback. It is a host process, as the registry and CoreDNS are (no controller image can be
# pulled here), so it reaches pods from the node itself: like a hostNetwork controller, it is
# admitted by the NetworkPolicies that kube-router enforces on the node whatever their selectors.
# No write timeout on the entry point, so long SSE streams are never cut; Go's reverse proxy
# flushes text/event-stream at once. Everything lives in .cache/ingress/.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
cache_dir="$repo_root/.cache"
bin_dir="$cache_dir/bin"
kubeconfig="$cache_dir/kubeconfig"
ingress_dir="$cache_dir/ingress"
ping_url="http://127.0.0.1:$ingress_ping_port/ping"

log() { printf 'ingress: %s\n' "$*" >&2; }
die() { printf 'ingress: error: %s\n' "$*" >&2; exit 1; }

kubectl_() { "$bin_dir/kubectl" --kubeconfig "$kubeconfig" "$@"; }

state_dir=$ingress_dir
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$repo_root/hack/lib.sh"

start() {
  [[ -f "$kubeconfig" ]] || die "the cluster is not up (hack/cluster.sh up)"
  mkdir -p "$ingress_dir"
  python3 "$repo_root/hack/build_tools.py" traefik >/dev/null
  kubectl_ apply -f "$repo_root/hack/cluster/ingress.yaml" >/dev/null
  # KUBECONFIG, not in-cluster configuration: Traefik would take a KUBERNETES_SERVICE_HOST for it.
  start_process traefik env -u KUBERNETES_SERVICE_HOST KUBECONFIG="$kubeconfig" "$bin_dir/traefik" \
    --global.checkNewVersion=false --global.sendAnonymousUsage=false \
    --entryPoints.web.address="$bridge_address:$ingress_port" \
    --entryPoints.web.transport.respondingTimeouts.writeTimeout=0 \
    --entryPoints.traefik.address="127.0.0.1:$ingress_ping_port" --ping=true \
    --providers.kubernetesingress=true --providers.kubernetesingress.ingressClass=traefik \
    --accesslog=true --log.level=INFO
  wait_for "Traefik answering its ping" 60 curl -fsS -o /dev/null --max-time 2 "$ping_url"
  log "Traefik serves Ingresses of class traefik at http://$bridge_address:$ingress_port"
}

stop() {
  stop_process traefik
}

status() {
  pid_alive traefik && curl -fsS -o /dev/null --max-time 2 "$ping_url"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if status; then log "running"; else log "not running"; exit 1; fi ;;
  *) die "usage: $0 start|stop|status" ;;
esac
