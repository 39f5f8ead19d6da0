#!/usr/bin/env bash
# The real node of the local cluster: containerd + runc, the CNI bridge, kubelet, kube-proxy,
# kube-router (NetworkPolicies) and CoreDNS as local processes, joined to the kwokctl control plane
# beside the fake kwok nodes.
# Its pods are real containers in network namespaces on this machine.
#
#   hack/node.sh up        start it (the control plane must be up: hack/cluster.sh up calls this)
#                          with the OCI registry on the bridge (hack/registry.sh) and the
#                          local-path-provisioner (StorageClass local-path, hack/cluster/local-path.yaml)
#   hack/node.sh up --without-network-policies
#                          the same without kube-router (the demo's cluster: NetworkPolicies are
#                          accepted but not enforced, and kube-router is not built)
#   hack/node.sh down      delete its pods, stop every process, undo mounts, rules, bridge, cgroups
#   hack/node.sh status [--without-network-policies]
#                          exit 0 if the node is Ready and its registry, provisioner (and kube-router) run
#   hack/node.sh import F  import an image archive (docker or OCI) into the node's containerd
#   hack/node.sh import-once F NAME KEY
#                          the same, unless NAME is there from an archive of the same KEY
#
# The network lives on a bridge of its own, $bridge with $bridge_address: node IP, kubelet address,
# pods' gateway, CoreDNS's address, and the API server's advertised address (relayed to its
# loopback listener). Only one real node can run per machine: the bridge, the kubelet's port and the
# cgroups are the machine's; `up` refuses while another checkout's node runs.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
cache_dir="$repo_root/.cache"
bin_dir="$cache_dir/bin"
node_dir="$cache_dir/node"
# Sockets and runtime state live under /run: unix socket paths must stay short, and they are the machine's.
run_dir=/run/modelfleet-node
owner_file="$run_dir/owner"
containerd_socket="$run_dir/containerd.sock"
kubeconfig="$cache_dir/kubeconfig"
cluster_name=modelfleet-dev
pki_dir="$cache_dir/kwok/clusters/$cluster_name/pki"
node_kubeconfig="$node_dir/kubeconfig"
images_cache="${MODELFLEET_IMAGES_CACHE:-$HOME/.cache/modelfleet/images}"
# The sandbox image containerd runs for every pod; made here from hack/node/pause.c (no registry).
pause_image=registry.k8s.io/pause:3.10
# Volumes of StorageClass local-path: with the node's other state, on the checkout's disk; the
# directories of a deleted cluster's volumes go with `hack/cluster.sh down`.
local_path_dir="$node_dir/local-path"
# The local-path helper pods' image (hack/cluster/local-path.yaml): built by hack/images.sh, not pulled.
helper_image=docker.io/library/python:3.11-slim-bookworm

log() { printf 'node: %s\n' "$*" >&2; }
die() { printf 'node: error: %s\n' "$*" >&2; exit 1; }
kubectl_() { "$bin_dir/kubectl" --kubeconfig "$kubeconfig" "$@"; }
ctr_() { ctr --address "$containerd_socket" --namespace k8s.io "$@"; }

state_dir=$node_dir
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$repo_root/hack/lib.sh"

bridge_up() {
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
  fi
  ip addr replace "$bridge_address/$pod_prefix_length" dev "$bridge"
  ip link set "$bridge" up
  # Pods reach each other, the node and Services through the bridge; the kernel must forward.
  sysctl -qw net.ipv4.ip_forward=1
  # Service traffic between two pods on this bridge must pass the nftables rules of kube-proxy.
  if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then sysctl -qw net.bridge.bridge-nf-call-iptables=1; fi
}

claim_machine() {
  mkdir -p "$run_dir"
  if [[ -f "$owner_file" && "$(cat "$owner_file")" != "$repo_root" ]]; then
    local other
    other=$(cat "$owner_file")
    if [[ -d "$other/.cache/node" ]] && pgrep -f -- "$other/.cache/node" >/dev/null 2>&1; then
      die "the real node of $other runs on this machine; stop it first (cd $other && make cluster-down)"
    fi
    log "taking over the machine's node state from $other (its processes are gone)"
    down_machine_state
  fi
  echo "$repo_root" >"$owner_file"
}

# A config file, replaced only when its content changes, and then in one rename: kube-proxy exits
# when it sees its file change, and `cat >` would show it an empty file for a moment even when
# `up` runs again with the same content.
write_config() {
  local path=$1 new
  new=$(mktemp "$path.XXXXXX")
  cat >"$new"
  if cmp -s "$new" "$path"; then rm -f "$new"; else mv "$new" "$path"; fi
}

write_configs() {
  mkdir -p "$node_dir/cni/net.d" "$node_dir/containerd" "$node_dir/kubelet" "$run_dir"
  # containerd 1.6 (Debian) with runc. restrict_oom_score_adj: this machine lacks CAP_SYS_RESOURCE,
  # so runc must not raise a container's oom_score_adj above its own (the sandbox failed without it).
  write_config "$node_dir/containerd/config.toml" <<EOF
version = 2
root = "$node_dir/containerd/root"
state = "$run_dir/containerd"
[grpc]
  address = "$containerd_socket"
[ttrpc]
  address = "$run_dir/containerd.ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin_dir"
    conf_dir = "$node_dir/cni/net.d"
EOF
  write_config "$node_dir/cni/net.d/10-modelfleet.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "modelfleet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$run_dir/ipam",
        "ranges": [[{"subnet": "$pod_subnet", "rangeStart": "$pod_range_start", "gateway": "$bridge_address"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # The admin credentials of the control plane, at the bridge address that pods and the node share.
  "$bin_dir/kubectl" --kubeconfig "$kubeconfig" config view --raw --minify --flatten >"$node_kubeconfig"
  chmod 600 "$node_kubeconfig"
  printf 'nameserver %s\n' "$bridge_address" >"$node_dir/resolv.conf"
  mkdir -p "$local_path_dir"
  printf '{"nodePathMap": [{"node": "%s", "paths": ["%s"]}]}\n' "$node_name" "$local_path_dir" \
    >"$node_dir/local-path-provisioner.json"
  write_config "$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $bridge_address
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
containerRuntimeEndpoint: unix://$containerd_socket
# This machine runs cgroup v1 in hybrid mode: the cgroupfs driver, and v1 allowed explicitly.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDNS: [$bridge_address]
clusterDomain: cluster.local
resolvConf: $node_dir/resolv.conf
# The API server presents the control plane's admin certificate to the kubelet (logs, exec, port-forward).
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki_dir/ca.crt}
authorization: {mode: Webhook}
registerWithTaints:
  # Only workloads that ask for the real node land here; every other pod stays on the kwok nodes.
  - {key: $real_node_taint_key, value: "true", effect: NoSchedule}
# Images are imported, never pulled: nothing may evict or collect them on a busy shared disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 110
EOF
  write_config "$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $node_kubeconfig}
hostnameOverride: $node_name
bindAddress: $bridge_address
clusterCIDR: $pod_subnet
healthzBindAddress: 127.0.0.1:$kube_proxy_healthz_port
metricsBindAddress: 127.0.0.1:$kube_proxy_metrics_port
# NodePorts answer on the bridge address only, never on the machine's other interfaces.
nodePortAddresses: ["$bridge_address/32"]
# Leave the machine's conntrack sysctls alone (this machine cannot raise every limit).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
EOF
  write_config "$node_dir/Corefile" <<EOF
.:53 {
    bind $bridge_address
    errors
    ready $bridge_address:$coredns_ready_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $node_kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

# The pause image, built once per content of pause.c, imported into the node's containerd.
ensure_pause_image() {
  if ctr_ images ls -q | grep -qx "$pause_image"; then
    return 0
  fi
  local digest archive
  digest=$(sha256sum "$repo_root/hack/node/pause.c" | cut -c1-16)
  archive="$images_cache/pause-$digest.tar"
  if [[ ! -f "$archive" ]]; then
    log "building $pause_image from hack/node/pause.c"
    mkdir -p "$images_cache"
    local work container
    work=$(mktemp -d)
    gcc -Os -static -o "$work/pause" "$repo_root/hack/node/pause.c"
    container=$(buildah from scratch)
    buildah copy "$container" "$work/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$container"
    buildah commit --quiet "$container" "$pause_image" >/dev/null
    buildah rm "$container" >/dev/null
    buildah push --quiet "$pause_image" "docker-archive:$archive.partial:$pause_image"
    mv "$archive.partial" "$archive"
    rm -rf "$work"
  fi
  ctr_ images import "$archive" >/dev/null
}

up() {
  [[ $EUID -eq 0 ]] || die "the real node needs root (network namespaces, mounts, cgroups)"
  [[ -f "$kubeconfig" ]] || die "the control plane is not up (hack/cluster.sh up)"
  local started=$SECONDS
  local -a tools=(kubelet kube-proxy coredns registry local-path-provisioner)
  ((network_policies)) && tools+=(kube-router)
  python3 "$repo_root/hack/build_tools.py" "${tools[@]}" >/dev/null
  for tool in containerd runc ctr nft iptables ipset socat buildah gcc; do
    command -v "$tool" >/dev/null || die "$tool is missing (make install-system)"
  done
  mkdir -p "$node_dir"
  claim_machine
  bridge_up
  "$repo_root/hack/registry.sh" start
  write_configs
  start_process containerd containerd --config "$node_dir/containerd/config.toml"
  wait_for "containerd answering" 30 ctr --address "$containerd_socket" version
  ensure_pause_image
  # The `kubernetes` Service's endpoint is the bridge address (advertised by the API server, which
  # itself listens on loopback only): relay that port there. TLS passes through untouched.
  local api_port
  api_port=$(kubectl_ config view --minify -o jsonpath='{.clusters[0].cluster.server}' | sed 's/.*://')
  start_process apiserver-relay socat "TCP-LISTEN:$api_port,bind=$bridge_address,fork,reuseaddr" "TCP:127.0.0.1:$api_port"
  start_process kubelet "$bin_dir/kubelet" --config "$node_dir/kubelet.yaml" --kubeconfig "$node_kubeconfig" \
    --hostname-override "$node_name" --node-ip "$bridge_address" --root-dir "$node_dir/kubelet" \
    --cert-dir "$node_dir/kubelet-pki" --node-labels "$real_node_label=true"
  start_process kube-proxy "$bin_dir/kube-proxy" --config "$node_dir/kube-proxy.yaml"
  start_process coredns "$bin_dir/coredns" -conf "$node_dir/Corefile"
  wait_for "node $node_name Ready" 120 kubectl_ wait --for=condition=Ready "node/$node_name" --timeout=5s
  # NetworkPolicies are enforced, as Calico or Cilium would enforce them: kube-router in
  # firewall-only mode turns the policies selecting this node's pods into iptables rules and
  # ipsets (bridged pod-to-pod traffic passes them: bridge-nf-call-iptables). As in any such
  # cluster, traffic from the node itself (kubelet probes, NodePorts from the host) is admitted.
  # It finds its node by name, so it starts once the kubelet has registered the node. Its health
  # port would listen on every interface: off; readiness is its chains existing.
  if ((network_policies)); then
    start_process kube-router "$bin_dir/kube-router" --kubeconfig "$kubeconfig" --hostname-override "$node_name" \
      --run-firewall=true --run-router=false --run-service-proxy=false --run-loadbalancer=false \
      --enable-ipv4=true --enable-ipv6=false --service-cluster-ip-range="$service_subnet" \
      --health-port=0 --metrics-port=0 --iptables-sync-period=1m
    wait_for "kube-router's NetworkPolicy chains" 60 iptables -S KUBE-ROUTER-FORWARD
  fi
  wait_for "CoreDNS ready" 60 curl -fsS "http://$bridge_address:$coredns_ready_port/ready"
  kubectl_ apply -f "$repo_root/hack/cluster/local-path.yaml" >/dev/null
  if ! ctr_ images ls -q | grep -qx "$helper_image"; then
    log "warning: $helper_image is not in the node's containerd: local-path volumes wait for it (make images, then hack/node.sh import)"
  fi
  start_process local-path-provisioner "$bin_dir/local-path-provisioner" start --kubeconfig "$node_kubeconfig" \
    --config "$node_dir/local-path-provisioner.json" --namespace local-path-storage \
    --configmap-name local-path-config --service-account-name local-path-provisioner --helper-image "$helper_image"
  log "$node_name is Ready in $((SECONDS - started))s ($(kubectl_ get node "$node_name" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}'))"
}

# kube-router's rules outlive it, and its own --cleanup-config would also flush the machine's IPVS
# services: remove exactly its jumps (commented "kube-router netpol"), its chains and its ipsets.
kube_router_cleanup() {
  local hook rule chain set
  for hook in INPUT FORWARD OUTPUT; do
    { iptables -S "$hook" 2>/dev/null | grep -F 'kube-router netpol' || true; } | while read -r rule; do
      eval "iptables ${rule/#-A/-D}" 2>/dev/null || true
    done
  done
  # Policy and pod chains jump to each other: flush them all, then delete them.
  local chains
  chains=$({ iptables -S 2>/dev/null | awk '$1 == "-N" {print $2}' | grep -E '^KUBE-(ROUTER|POD-FW|NWPLCY)-' || true; })
  for chain in $chains; do iptables -F "$chain" 2>/dev/null || true; done
  for chain in $chains; do iptables -X "$chain" 2>/dev/null || true; done
  for set in $({ ipset list -n 2>/dev/null | grep -E '^KUBE-(SRC|DST)-' || true; }); do
    ipset destroy "$set" 2>/dev/null || true
  done
}

# Remove what the node leaves in the machine: mounts, rules, the bridge, IPAM state and cgroups.
# Each step may find nothing to remove (grep then exits 1), which must not stop the next ones.
down_machine_state() {
  if [[ -d "$node_dir/kubelet" ]]; then
    # Deepest first: pods' volume mounts sit inside the kubelet's root.
    { findmnt -rn -o TARGET | grep -F -- "$node_dir/kubelet" || true; } | sort -r | while read -r target; do
      umount -l "$target" 2>/dev/null || true
    done
  fi
  { findmnt -rn -o TARGET | grep -F -- "$run_dir" || true; } | sort -r | while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done
  # kube-proxy's own tables, and the masquerade chain that the CNI bridge plugin (ipMasq) made for
  # each pod of this network whose sandbox was not torn down through CNI. Other networks' rules
  # (podman's, say) are left alone: only rules commented with this network's name are removed.
  nft delete table ip kube-proxy 2>/dev/null || true
  nft delete table ip6 kube-proxy 2>/dev/null || true
  kube_router_cleanup
  local rule chain
  { iptables -t nat -S POSTROUTING 2>/dev/null | grep -F 'name: \"modelfleet\"' || true; } | while read -r rule; do
    chain=${rule##*-j }
    # The rule as iptables printed it, quotes included, with -A turned into -D.
    eval "iptables -t nat ${rule/#-A/-D}" 2>/dev/null || true
    iptables -t nat -F "$chain" 2>/dev/null || true
    iptables -t nat -X "$chain" 2>/dev/null || true
  done
  if ip link show "$bridge" >/dev/null 2>&1; then ip link delete "$bridge"; fi
  rm -rf "$run_dir/ipam"
  # The kubelet's QoS cgroups (cgroupfs driver), deepest first, in every v1 hierarchy.
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    if [[ -d "${hierarchy}kubepods" ]]; then
      find "${hierarchy}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
  done
  rm -f "$owner_file"
}

down() {
  # No new helper pods from here on; the drain below deletes any that are left.
  stop_process local-path-provisioner
  if [[ -f "$kubeconfig" ]] && pid_alive kubelet && kubectl_ get node "$node_name" >/dev/null 2>&1; then
    # Delete the workloads while the kubelet still runs, so it stops their containers itself.
    log "draining $node_name"
    local namespaced
    namespaced=$(kubectl_ get pods -A --field-selector "spec.nodeName=$node_name" \
      -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null || true)
    while read -r entry; do
      [[ -n "$entry" ]] || continue
      kubectl_ -n "${entry%%/*}" delete pod "${entry#*/}" --grace-period=5 --wait=false >/dev/null 2>&1 || true
    done <<<"$namespaced"
    local deadline=$((SECONDS + 40))
    while ((SECONDS < deadline)) && [[ -n "$(ctr_ containers ls -q 2>/dev/null)" ]]; do sleep 1; done
  fi
  # A helper pod whose provisioner was stopped mid-operation: the kubelet may be gone before it
  # confirms the deletion, and a helper pod found again later stalls that volume's next operation.
  if [[ -f "$kubeconfig" ]]; then
    kubectl_ -n local-path-storage delete pods --all --force --grace-period=0 >/dev/null 2>&1 || true
  fi
  stop_process coredns
  stop_process kube-router
  stop_process kube-proxy
  stop_process kubelet
  stop_process apiserver-relay
  "$repo_root/hack/registry.sh" stop
  "$repo_root/hack/hfmirror.sh" stop
  if [[ -f "$kubeconfig" ]]; then kubectl_ delete node "$node_name" --wait=false >/dev/null 2>&1 || true; fi
  if [[ -x "$bin_dir/kube-proxy" ]]; then "$bin_dir/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  # Containers the kubelet did not stop (it was gone already): kill their tasks before containerd goes.
  if pid_alive containerd; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      ctr_ tasks delete --force "$id" >/dev/null 2>&1 || true
      ctr_ containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  stop_process containerd
  # containerd-shim processes outlive containerd; they belong to this node's state directory.
  pkill -f -- "containerd-shim.*-namespace k8s.io.*-address $containerd_socket" 2>/dev/null || true
  down_machine_state
  log "$node_name is down"
}

# Ready, with its registry and volume provisioner: otherwise `hack/cluster.sh up` runs `up` again,
# which starts only what is missing.
status() {
  pid_alive kubelet && kubectl_ get node "$node_name" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True &&
    pid_alive kube-proxy && { ((!network_policies)) || pid_alive kube-router; } && pid_alive coredns &&
    pid_alive local-path-provisioner &&
    "$repo_root/hack/registry.sh" status 2>/dev/null
}

import_image() {
  [[ -f "${1:-}" ]] || die "usage: $0 import ARCHIVE"
  ctr_ images import "$1" >/dev/null
}

# import-once ARCHIVE NAME KEY: import unless the node has NAME from an archive of the same KEY (for
# images of several GB, whose import takes a minute).
import_once() {
  local archive=${1:-} name=${2:-} key=${3:-} marker
  [[ -f "$archive" && -n "$name" && -n "$key" ]] || die "usage: $0 import-once ARCHIVE NAME KEY"
  marker="$node_dir/imported-${name//[\/:]/_}"
  if [[ -f "$marker" && $(<"$marker") == "$key" ]] && ctr_ images ls -q | grep -qxF "$name"; then
    return 0
  fi
  ctr_ images import "$archive" >/dev/null
  printf '%s\n' "$key" >"$marker"
}

# Whether kube-router enforces NetworkPolicies: yes, unless up or status is told otherwise.
network_policies=1
if [[ "${2:-}" == --without-network-policies ]]; then network_policies=0; fi

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if status; then log "$node_name is Ready"; else log "$node_name is not running"; exit 1; fi ;;
  import) shift; import_image "$@" ;;
  import-once) shift; import_once "$@" ;;
  *) die "usage: $0 up|down|status|import ARCHIVE|import-once ARCHIVE NAME KEY" ;;
esac
