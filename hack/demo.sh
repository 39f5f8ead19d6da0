#!/usr/bin/env bash
# `make demo`: the local cluster with its GPU nodes and its real node, the chart installed there for
# real (operator, router and Redis as containers built from this repository), a real model server,
# and a streamed chat through the router to an InferenceModel.
#
#   hack/demo.sh up     cluster up with the real node, images built and imported, Ollama serving
#                       gemma3:270m on the node's bridge, the chart installed (its pods on the real
#                       node, its operator scoped to the namespace `demo`), an InferenceModel
#                       pointing at Ollama, a real streamed answer through the router's NodePort
#   hack/demo.sh down   stop the demo's Ollama, then the cluster
#
# The demo's Ollama keeps running after `up` so that the printed requests work; its port, pid and
# log are in .cache/demo/, and .cache/demo/env holds ROUTER_URL, API_KEY, ADMIN_KEY, MODEL and
# MODEL_URL for `source`.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo_dir="$repo_root/.cache/demo"
python="$repo_root/.venv/bin/python"
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
kubectl_() { "$repo_root/.cache/bin/kubectl" --kubeconfig "$repo_root/.cache/kubeconfig" "$@"; }
helm_() { "$repo_root/.cache/bin/helm" --kubeconfig "$repo_root/.cache/kubeconfig" "$@"; }

# The release: its operator runs the models of namespace `demo` only, so that the tests' own
# operators and models (in t-* namespaces) never meet it, whichever of `make demo` and `make test`
# runs first.
namespace=modelfleet-demo
release=demo
models_namespace=demo

stop_process() {
  if [[ -f "$demo_dir/$1.pid" ]]; then
    kill "$(cat "$demo_dir/$1.pid")" 2>/dev/null || true
    rm -f "$demo_dir/$1.pid"
  fi
}

# A port that was free a moment ago on ADDRESS.
free_port() { "$python" -c 'import socket, sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"; }

answers() { curl -fsS --max-time 1 "$1" >/dev/null 2>&1; }

# record_and_wait NAME PID PORT URL SECONDS: remember a background server, wait until URL answers.
record_and_wait() {
  echo "$2" >"$demo_dir/$1.pid"
  printf 'PORT=%s\n' "$3" >"$demo_dir/$1.env"
  local deadline=$((SECONDS + $5))
  until answers "$4"; do
    ((SECONDS < deadline)) || { tail -n 20 "$demo_dir/$1.log" >&2; echo "demo: $1 did not start" >&2; exit 1; }
    sleep 0.2
  done
}

# Ollama on the real node's bridge, where the router's pods reach it (and nothing outside this machine).
start_ollama() {
  local store port
  store=$("$python" "$repo_root/hack/ollama_model.py" prepare)
  mkdir -p "$demo_dir"
  port=$(sed -n 's/^PORT=//p' "$demo_dir/ollama.env" 2>/dev/null || true)
  if [[ -n "$port" ]] && answers "http://$bridge_address:$port/api/version"; then
    model_url="http://$bridge_address:$port"
    return 0
  fi
  stop_process ollama
  port=$(free_port "$bridge_address")
  model_url="http://$bridge_address:$port"
  mkdir -p "$demo_dir/home"
  # A private models directory of hard links, so the demo never changes the cached store.
  rm -rf "$demo_dir/models" && cp -al "$store" "$demo_dir/models"
  (
    cd "$demo_dir"
    exec env -i PATH="$PATH" HOME="$demo_dir/home" OLLAMA_HOST="$bridge_address:$port" \
      OLLAMA_MODELS="$demo_dir/models" OLLAMA_KEEP_ALIVE=-1 OLLAMA_NO_CLOUD=1 OLLAMA_NOPRUNE=1 \
      "$repo_root/.cache/bin/ollama" serve >"$demo_dir/ollama.log" 2>&1
  ) &
  record_and_wait ollama $! "$port" "$model_url/api/version" 60
}

install_chart() {
  kubectl_ create namespace "$models_namespace" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ create namespace "$namespace" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ label namespace "$namespace" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
  helm_ upgrade --install "$release" "$repo_root/charts/modelfleet" --namespace "$namespace" \
    --values "$repo_root/hack/cluster/realnode-values.yaml" \
    --set-json "operator.watchNamespaces=[\"$models_namespace\"]" \
    --set "router.discoveryNamespace=$models_namespace" \
    --wait --timeout 10m >/dev/null
  kubectl_ -n "$namespace" get pods -o wide
}

up() {
  "$repo_root/hack/cluster.sh" up
  echo
  echo "== Nodes of modelfleet-dev: fake kwok nodes for GPUs and scale, and one real node =="
  kubectl_ get nodes -o wide
  kubectl_ get nodes -o custom-columns='NODE:.metadata.name,GPU:.status.allocatable.nvidia\.com/gpu,CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory,TAINTS:.spec.taints[*].key'

  echo
  echo "== Images: built from Dockerfile.server and Dockerfile.operator, imported into the real node =="
  "$repo_root/hack/images.sh" build
  local archive
  for archive in "$repo_root"/.cache/images/*.tar; do "$repo_root/hack/node.sh" import "$archive"; done

  echo
  echo "== Ollama $("$repo_root/.cache/bin/ollama" --version 2>/dev/null | awk '/version/ {print $NF}') (our CPU build) serving gemma3:270m =="
  local model_url
  start_ollama
  echo "$model_url"

  echo
  echo "== The ModelFleet chart, installed for real on the real node (release $release in $namespace) =="
  install_chart
  local secret="$release-modelfleet-api-keys" api_key admin_key node_port
  api_key=$(kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.user-key}' | base64 -d)
  admin_key=$(kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.admin-key}' | base64 -d)
  node_port=$(kubectl_ -n "$namespace" get service "$release-modelfleet-router" -o jsonpath='{.spec.ports[0].nodePort}')
  local router_url="http://$bridge_address:$node_port"

  echo
  echo "== An InferenceModel that points at Ollama =="
  kubectl_ apply -f - <<EOF
apiVersion: modelfleet.io/v1alpha1
kind: InferenceModel
metadata: {name: gemma, namespace: $models_namespace}
spec:
  model: gemma3:270m
  endpoint: {url: "$model_url", api: ollama}
  serving: {aliases: [gemma3], maxInFlightPerReplica: 2}
EOF
  kubectl_ -n "$models_namespace" wait --for=condition=Ready inferencemodel.modelfleet.io/gemma --timeout=120s
  kubectl_ -n "$models_namespace" get inferencemodels.modelfleet.io
  local deadline=$((SECONDS + 60))
  until curl -fsS -H "Authorization: Bearer $api_key" "$router_url/v1/models" 2>/dev/null | grep -q '"gemma"'; do
    ((SECONDS < deadline)) || { echo "demo: the router pods did not pick up the InferenceModel" >&2; exit 1; }
    sleep 0.5
  done
  {
    printf 'ROUTER_URL=%s\n' "$router_url"
    printf 'API_KEY=%s\n' "$api_key"
    printf 'ADMIN_KEY=%s\n' "$admin_key"
    printf 'MODEL=%s\n' gemma
    printf 'MODEL_URL=%s\n' "$model_url"
  } >"$demo_dir/env"
  chmod 600 "$demo_dir/env"

  local prompt="Write one sentence about lighthouses."
  echo
  echo "A streamed chat through the router's pods (the model found through the InferenceModel) to Ollama, as it arrives:"
  echo
  "$python" "$repo_root/hack/ollama_model.py" chat "$router_url/v1" "$prompt" gemma "$api_key"
  echo
  echo "Try it yourself (raw SSE through the router), or point the openai SDK at \$ROUTER_URL/v1:"
  echo "  source .cache/demo/env && export OPENAI_API_KEY=\$API_KEY"
  echo "  curl -N \$ROUTER_URL/v1/chat/completions -H \"Authorization: Bearer \$OPENAI_API_KEY\" \\"
  echo "    -H 'Content-Type: application/json' \\"
  echo "    -d '{\"model\":\"gemma\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}]}'"
  echo
  echo "The router ($router_url, a NodePort on the real node's bridge), the operator and Redis run as pods:"
  echo "  .cache/bin/kubectl --kubeconfig .cache/kubeconfig -n $namespace get pods"
  echo "Ollama ($model_url) keeps running; its log is in $demo_dir. Stop everything with: make demo-down"
  echo "Note: the packaged GGUF is Gemma 3 270M's base (pretrained) model: it continues text rather than following instructions, so chat answers are often off-topic. The serving path is what this shows."
}

case "${1:-up}" in
  up) up ;;
  down) stop_process ollama; rm -f "$demo_dir"/*.env "$demo_dir/env"; "$repo_root/hack/cluster.sh" down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
