#!/usr/bin/env bash
# `make demo`: the local cluster with its GPU nodes, a real model server, the chart installed, and a
# streamed chat through the router to an InferenceModel.
#
#   hack/demo.sh up     cluster up, nodes shown, Ollama serving gemma3:270m on 127.0.0.1, the chart
#                       installed, operator + router as local processes with the chart's
#                       ServiceAccounts, an InferenceModel pointing at Ollama, a real answer
#   hack/demo.sh down   stop the demo's processes and the cluster
#
# The demo's Ollama keeps running after `up` so that the printed requests work; its port, pid
# and log are in .cache/demo/.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo_dir="$repo_root/.cache/demo"
python="$repo_root/.venv/bin/python"
kubectl_() { "$repo_root/.cache/bin/kubectl" --kubeconfig "$repo_root/.cache/kubeconfig" "$@"; }

stop_process() {
  if [[ -f "$demo_dir/$1.pid" ]]; then
    kill "$(cat "$demo_dir/$1.pid")" 2>/dev/null || true
    rm -f "$demo_dir/$1.pid"
  fi
}

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

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

up() {
  "$repo_root/hack/cluster.sh" up
  echo
  echo "== Nodes of modelfleet-dev (fake kwok nodes, real control plane) =="
  kubectl_ get nodes -L nvidia.com/gpu.present,node.kubernetes.io/instance-type
  kubectl_ get nodes -o custom-columns='NODE:.metadata.name,GPU:.status.allocatable.nvidia\.com/gpu,CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory,TAINTS:.spec.taints[*].key'

  echo
  echo "== Ollama $("$repo_root/.cache/bin/ollama" --version 2>/dev/null | awk '{print $NF}') (our CPU build) serving gemma3:270m =="
  [[ -x "$python" ]] || { echo "demo: run 'make install' first" >&2; exit 1; }
  local store port
  store=$("$python" "$repo_root/hack/ollama_model.py" prepare)
  mkdir -p "$demo_dir"
  port=$(sed -n 's/^PORT=//p' "$demo_dir/ollama.env" 2>/dev/null || true)
  if [[ -z "$port" ]] || ! answers "http://127.0.0.1:$port/api/version"; then
    stop_process ollama
    port=$(free_port)
    mkdir -p "$demo_dir/home"
    # A private models directory of hard links, so the demo never changes the cached store.
    rm -rf "$demo_dir/models" && cp -al "$store" "$demo_dir/models"
    (
      cd "$demo_dir"
      exec env -i PATH="$PATH" HOME="$demo_dir/home" OLLAMA_HOST="127.0.0.1:$port" OLLAMA_MODELS="$demo_dir/models" \
        OLLAMA_KEEP_ALIVE=-1 OLLAMA_NO_CLOUD=1 OLLAMA_NOPRUNE=1 \
        "$repo_root/.cache/bin/ollama" serve >"$demo_dir/ollama.log" 2>&1
    ) &
    record_and_wait ollama $! "$port" "http://127.0.0.1:$port/api/version" 60
  fi

  echo
  echo "== The ModelFleet chart, installed into modelfleet-dev =="
  # Release "demo" (objects demo-modelfleet-*), so it never collides with what the e2e tests apply.
  local namespace=modelfleet-demo release=demo
  "$repo_root/.cache/bin/helm" --kubeconfig "$repo_root/.cache/kubeconfig" upgrade --install "$release" \
    "$repo_root/charts/modelfleet" --namespace "$namespace" --create-namespace >/dev/null
  kubectl_ -n "$namespace" get statefulsets,deployments,services -l app.kubernetes.io/instance="$release"
  # kwok pods never run a container, so the operator and the router run here as local processes,
  # each with exactly its chart ServiceAccount's permissions (a bound token, not the admin cert).
  kubeconfig_for operator "$namespace" "$release-modelfleet-operator"
  kubeconfig_for router "$namespace" "$release-modelfleet-router"
  local secret="$release-modelfleet-api-keys" api_key
  kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.keys\.yaml}' | base64 -d >"$demo_dir/keys.yaml"
  api_key=$(kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.user-key}' | base64 -d)

  local operator_health
  operator_health=$(sed -n 's/^PORT=//p' "$demo_dir/operator.env" 2>/dev/null || true)
  if [[ -z "$operator_health" ]] || ! answers "http://127.0.0.1:$operator_health/healthz"; then
    stop_process operator
    operator_health=$(free_port)
    env KUBECONFIG="$demo_dir/operator.kubeconfig" MODELFLEET_OPERATOR_STANDALONE=true \
      MODELFLEET_OPERATOR_LIVENESS_HOST=127.0.0.1 MODELFLEET_OPERATOR_LIVENESS_PORT="$operator_health" \
      MODELFLEET_OPERATOR_METRICS_HOST=127.0.0.1 MODELFLEET_OPERATOR_METRICS_PORT="$(free_port)" \
      "$python" -m modelfleet.operator >"$demo_dir/operator.log" 2>&1 &
    record_and_wait operator $! "$operator_health" "http://127.0.0.1:$operator_health/healthz" 60
  fi
  local router_port
  router_port=$(sed -n 's/^PORT=//p' "$demo_dir/router.env" 2>/dev/null || true)
  if [[ -z "$router_port" ]] || ! answers "http://127.0.0.1:$router_port/readyz"; then
    stop_process router
    router_port=$(free_port)
    env MODELFLEET_HOST=127.0.0.1 MODELFLEET_PORT="$router_port" MODELFLEET_KUBERNETES_DISCOVERY=true \
      MODELFLEET_KUBECONFIG="$demo_dir/router.kubeconfig" MODELFLEET_API_KEYS_FILE="$demo_dir/keys.yaml" \
      "$python" -m modelfleet.server >"$demo_dir/router.log" 2>&1 &
    record_and_wait router $! "$router_port" "http://127.0.0.1:$router_port/readyz" 30
  fi

  echo
  echo "== An InferenceModel that points at the local Ollama =="
  kubectl_ apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: modelfleet.io/v1alpha1
kind: InferenceModel
metadata: {name: gemma, namespace: demo}
spec:
  model: gemma3:270m
  endpoint: {url: "http://127.0.0.1:$port", api: ollama}
  serving: {aliases: [gemma3], maxInFlightPerReplica: 2}
EOF
  kubectl_ -n demo wait --for=condition=Ready inferencemodel.modelfleet.io/gemma --timeout=60s
  kubectl_ -n demo get inferencemodels.modelfleet.io
  local deadline=$((SECONDS + 30))
  until curl -fsS -H "Authorization: Bearer $api_key" "http://127.0.0.1:$router_port/v1/models" | grep -q '"gemma"'; do
    ((SECONDS < deadline)) || { echo "demo: the router did not pick up the InferenceModel" >&2; exit 1; }
    sleep 0.2
  done

  local prompt="Write one sentence about lighthouses."
  echo
  echo "A streamed chat through the router (found through the InferenceModel) to Ollama, as it arrives:"
  echo
  "$python" "$repo_root/hack/ollama_model.py" chat "http://127.0.0.1:$router_port/v1" "$prompt" gemma "$api_key"
  echo
  echo "Try it yourself (raw SSE through the router), or point the openai SDK at http://127.0.0.1:$router_port/v1:"
  echo "  export OPENAI_API_KEY=$api_key"
  echo "  curl -N http://127.0.0.1:$router_port/v1/chat/completions -H \"Authorization: Bearer \$OPENAI_API_KEY\" \\"
  echo "    -H 'Content-Type: application/json' \\"
  echo "    -d '{\"model\":\"gemma\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}]}'"
  echo
  echo "Ollama (127.0.0.1:$port), the operator and the router (127.0.0.1:$router_port) keep running; logs in $demo_dir."
  echo "Stop everything with: make demo-down"
  echo "Note: the packaged GGUF is Gemma 3 270M's base (pretrained) model: it continues text rather than following instructions, so chat answers are often off-topic. The serving path is what this shows."
}

# kubeconfig_for NAME NAMESPACE SERVICEACCOUNT: .cache/demo/NAME.kubeconfig, authenticated by the account's bound token.
kubeconfig_for() {
  local file="$demo_dir/$1.kubeconfig" server ca token
  server=$(kubectl_ config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  ca=$(kubectl_ config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority}')
  token=$(kubectl_ -n "$2" create token "$3" --duration=24h)
  rm -f "$file"
  local kubectl_file=("$repo_root/.cache/bin/kubectl" --kubeconfig "$file")
  "${kubectl_file[@]}" config set-cluster local --server "$server" --certificate-authority "$ca" >/dev/null
  "${kubectl_file[@]}" config set-credentials "$1" --token "$token" >/dev/null
  "${kubectl_file[@]}" config set-context "$1" --cluster local --user "$1" >/dev/null
  "${kubectl_file[@]}" config use-context "$1" >/dev/null
  chmod 600 "$file"
}

case "${1:-up}" in
  up) up ;;
  down) stop_process router; stop_process operator; stop_process ollama; rm -f "$demo_dir"/*.env; "$repo_root/hack/cluster.sh" down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
