#!/usr/bin/env bash
# The local Kubernetes of ModelFleet: kwokctl's binary runtime (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok, all as local processes, no Docker),
# with two fake GPU nodes and one fake CPU node for scheduling and scale, and one real node
# (hack/node.sh: containerd, kubelet, kube-proxy, kube-router enforcing NetworkPolicies, CoreDNS)
# whose pods really run, the metrics pipeline of the HPAs (hack/monitoring.sh: Prometheus,
# prometheus-adapter as external.metrics.k8s.io), and an ingress controller (hack/ingress.sh: Traefik).
#
#   hack/cluster.sh up       create it, or return at once if it is already running
#   hack/cluster.sh up demo  the same without what only the tests use: no kube-router (NetworkPolicies
#                            are accepted, not enforced) and no Traefik, so neither is built; a later
#                            `up` adds both to the running cluster
#   hack/cluster.sh down     stop every process it started and delete its state
#   hack/cluster.sh status [demo]
#                            exit 0 if it is running (with what that profile needs) and is the one
#                            `up` created
#
# The kubeconfig goes to .cache/kubeconfig; .cache/cluster.env records the identity
# (API server URL and kube-system UID) that the test guard checks before touching it.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster_name=modelfleet-dev
cache_dir="$repo_root/.cache"
kubeconfig="$cache_dir/kubeconfig"
identity_file="$cache_dir/cluster.env"
bin_dir="$cache_dir/bin"
# Cluster state lives with the checkout, so that two clones never share or delete each other's cluster.
export KWOK_WORKDIR="$cache_dir/kwok"
rendered_config="$cache_dir/kwokctl.yaml"
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

kubectl_() { "$bin_dir/kubectl" --kubeconfig "$kubeconfig" --context "kwok-$cluster_name" "$@"; }

kwokctl_() { "$bin_dir/kwokctl" --name "$cluster_name" "$@"; }

# hack/cluster/kwokctl.yaml with its placeholders filled in; a cluster made from another rendering is stale.
render_config() {
  sed -e "s|@BRIDGE_ADDRESS@|$bridge_address|g" \
    -e "s|@KUBERNETES_SERVICE_IP@|$kubernetes_service_ip|g" \
    -e "s|@SERVICE_SUBNET@|$service_subnet|g" \
    -e "s|@PKI_DIR@|$KWOK_WORKDIR/clusters/$cluster_name/pki|g" \
    -e "s|@CLUSTER_DIR@|$KWOK_WORKDIR/clusters/$cluster_name|g" \
    -e "s|@REPO_ROOT@|$repo_root|g" \
    "$repo_root/hack/cluster/kwokctl.yaml"
}

config_digest() { render_config | sha256sum | cut -c1-16; }

is_healthy() {
  [[ -f "$kubeconfig" && -f "$identity_file" && -x "$bin_dir/kubectl" ]] || return 1
  [[ "$(sed -n 's/^CONFIG_DIGEST=//p' "$identity_file")" == "$(config_digest)" ]] || return 1
  kubectl_ get --raw /readyz --request-timeout=3s >/dev/null 2>&1 || return 1
  local recorded_uid current_uid
  recorded_uid=$(sed -n 's/^KUBE_SYSTEM_UID=//p' "$identity_file")
  current_uid=$(kubectl_ get namespace kube-system -o jsonpath='{.metadata.uid}' --request-timeout=3s 2>/dev/null) || return 1
  [[ -n "$recorded_uid" && "$recorded_uid" == "$current_uid" ]]
}

remove_stale() {
  if [[ -d "$KWOK_WORKDIR/clusters/$cluster_name" ]]; then
    log "removing a stale $cluster_name (its processes are gone or it is not the recorded cluster)"
    kwokctl_ delete cluster --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
    # kwokctl stops what its pid files name; a process that lost its pid file is found by its work dir.
    pkill -f -- "$KWOK_WORKDIR/clusters/$cluster_name" 2>/dev/null || true
    rm -rf "$KWOK_WORKDIR/clusters/$cluster_name"
  fi
  # The local-path volumes of the real node belonged to that cluster's claims.
  rm -rf "$cache_dir/node/local-path"
  rm -f "$identity_file"
}

up() {
  local started=$SECONDS
  if is_healthy; then
    log "$cluster_name is already running ($(sed -n 's/^SERVER=//p' "$identity_file"))"
    "$repo_root/hack/node.sh" status "${node_args[@]}" 2>/dev/null || "$repo_root/hack/node.sh" up "${node_args[@]}"
    "$repo_root/hack/monitoring.sh" status 2>/dev/null || "$repo_root/hack/monitoring.sh" start
    if ((with_ingress)); then
      "$repo_root/hack/ingress.sh" status 2>/dev/null || "$repo_root/hack/ingress.sh" start
    fi
    return 0
  fi
  local -a tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwokctl
    kubelet kube-proxy coredns registry local-path-provisioner prometheus prometheus-adapter)
  ((with_ingress)) && tools+=(kube-router traefik)
  python3 "$repo_root/hack/build_tools.py" "${tools[@]}"
  "$repo_root/hack/node.sh" down 2>/dev/null || true
  remove_stale
  mkdir -p "$cache_dir"
  render_config >"$rendered_config"
  log "creating $cluster_name with kwokctl --runtime binary"
  mkdir -p "$KWOK_WORKDIR"
  local create_log="$KWOK_WORKDIR/create-$cluster_name.log"
  if ! kwokctl_ create cluster \
    --config "$rendered_config" \
    --runtime binary \
    --kubeconfig "$kubeconfig" \
    --etcd-binary "$bin_dir/etcd" \
    --kube-apiserver-binary "$bin_dir/kube-apiserver" \
    --kube-controller-manager-binary "$bin_dir/kube-controller-manager" \
    --kube-scheduler-binary "$bin_dir/kube-scheduler" \
    --kwok-controller-binary "$bin_dir/kwok" \
    --kube-authorization=true \
    --kube-admission=true \
    --extra-args kube-controller-manager=enable-hostpath-provisioner=true \
    --wait 120s >"$create_log" 2>&1; then
    tail -n 20 "$create_log" >&2
    die "kwokctl could not create $cluster_name (full log: $create_log; component logs: kwokctl --name $cluster_name logs <component>)"
  fi
  kubectl_ apply -f "$repo_root/hack/cluster/nodes.yaml" -f "$repo_root/hack/cluster/storage.yaml" >/dev/null
  kubectl_ wait --for=condition=Ready node --all --timeout=120s >/dev/null
  # Pods need the default ServiceAccount, which the controller-manager creates.
  local deadline=$((SECONDS + 60))
  until kubectl_ get serviceaccount default -n default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the controller-manager did not create the default ServiceAccount within 60s"
    sleep 0.5
  done
  {
    printf 'CLUSTER_NAME=%s\n' "$cluster_name"
    printf 'CONTEXT=kwok-%s\n' "$cluster_name"
    printf 'SERVER=%s\n' "$(kubectl_ config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
    printf 'KUBE_SYSTEM_UID=%s\n' "$(kubectl_ get namespace kube-system -o jsonpath='{.metadata.uid}')"
    printf 'CONFIG_DIGEST=%s\n' "$(config_digest)"
  } >"$identity_file"
  "$repo_root/hack/node.sh" up "${node_args[@]}"
  "$repo_root/hack/monitoring.sh" start
  if ((with_ingress)); then
    "$repo_root/hack/ingress.sh" start
  else
    log "profile demo: no NetworkPolicy enforcer and no ingress controller (\`hack/cluster.sh up\` adds them)"
  fi
  log "$cluster_name is up in $((SECONDS - started))s; kubeconfig: $kubeconfig"
  kubectl_ get nodes -o custom-columns='NAME:.metadata.name,STATUS:.status.conditions[?(@.type=="Ready")].status,RUNTIME:.status.nodeInfo.containerRuntimeVersion,GPU:.status.allocatable.nvidia\.com/gpu,CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory' >&2
}

down() {
  "$repo_root/hack/ingress.sh" stop || true
  "$repo_root/hack/monitoring.sh" stop || true
  # The real node first, while the API server can still delete its pods.
  "$repo_root/hack/node.sh" down || true
  if [[ -d "$KWOK_WORKDIR/clusters/$cluster_name" ]]; then
    log "deleting $cluster_name"
    kwokctl_ delete cluster --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
  fi
  pkill -f -- "$KWOK_WORKDIR/clusters/$cluster_name" 2>/dev/null || true
  rm -rf "${KWOK_WORKDIR:?}/clusters/$cluster_name" "$cache_dir/node/local-path"
  rm -f "$identity_file" "$kubeconfig"
  log "$cluster_name is down"
}

# The profile: full (what the tests need) unless `demo` follows the command.
case "${2:-full}" in
  full) with_ingress=1 node_args=() ;;
  demo) with_ingress=0 node_args=(--without-network-policies) ;;
  *) die "unknown profile ${2:-}; use full or demo" ;;
esac

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    if is_healthy && "$repo_root/hack/node.sh" status "${node_args[@]}" 2>/dev/null &&
      "$repo_root/hack/monitoring.sh" status 2>/dev/null &&
      { ((!with_ingress)) || "$repo_root/hack/ingress.sh" status 2>/dev/null; }; then log "$cluster_name is running"; else
      log "$cluster_name is not running"
      exit 1
    fi
    ;;
  *) die "usage: $0 up|down|status [full|demo]" ;;
esac
