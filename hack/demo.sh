#!/usr/bin/env bash
# `make demo`: the local cluster with its GPU nodes and its real node, the chart installed there for
# real (operator, router and Redis as containers built from this repository), a managed model that
# the operator deploys from the cluster's own OCI registry, and a streamed chat through the router.
#
#   hack/demo.sh up     cluster up with the real node (and its registry and local-path volumes;
#                       the demo profile: no NetworkPolicy enforcer and no ingress controller, which
#                       only the tests use, so neither is built), images built and imported, gemma3:270m pushed to the registry with
#                       `ollama push`, the chart installed (its pods on the real node, its operator
#                       scoped to the namespace `demo`), an InferenceModel with runtime ollama whose
#                       weights a prefetch Job pulls into a volume and that the HPA scales from 1
#                       to 2 replicas on the router's queue depth (`make demo-load` shows it), a real
#                       streamed answer through the router's NodePort, the steps' durations and
#                       what to do next
#   hack/demo.sh vllm   after `up`: the vLLM CPU image built and imported, the cluster's Hugging
#                       Face mirror started, and an InferenceModel gemma-vllm with runtime vllm (no
#                       GPU) beside the Ollama one, its weights downloaded from the mirror, and a
#                       streamed chat through the same router
#   hack/demo.sh down   stop the cluster (and everything on the real node)
#
# .cache/demo/env holds ROUTER_URL, API_KEY, ADMIN_KEY, MODEL and MODEL_URL (the model Service's
# own address, reachable from this machine) for `source`.
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
registry="$bridge_address:$registry_port"

install_chart() {
  kubectl_ create namespace "$models_namespace" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ create namespace "$namespace" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  local ns
  for ns in "$namespace" "$models_namespace"; do
    kubectl_ label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
  done
  helm_ upgrade --install "$release" "$repo_root/charts/modelfleet" --namespace "$namespace" \
    --values "$repo_root/hack/cluster/realnode-values.yaml" \
    --set-json "operator.watchNamespaces=[\"$models_namespace\"]" \
    --set "router.discoveryNamespace=$models_namespace" \
    --wait --timeout 10m >/dev/null
  kubectl_ -n "$namespace" get pods -o wide
}

# The managed model: Ollama on the real node (no GPU), its weights pulled from the registry into a
# local-path volume by the prefetch Job, Ready once it has answered the operator's warm-up.
# It is autoscaled from the start, as a user would declare it, rather than patched by `make demo-load`:
# the HPA then reads the queue before any load comes (its first looks and the adapter's first series
# are done), `kubectl get hpa` shows it from the start, and demo-load leaves the model as the demo
# made it. 1 to 2 replicas at one queued request per replica, and a 30 s scale-down window so that
# demo-load sees it back at 1 within minutes. The per-key limit is raised from the router's 100 a
# minute so that demo-load's bounded load is queued, not refused.
apply_model() {
  kubectl_ apply -f - <<EOF
apiVersion: modelfleet.io/v1alpha1
kind: InferenceModel
metadata: {name: gemma, namespace: $models_namespace}
spec:
  runtime: ollama
  model: gemma3:270m
  source: {registry: "$registry", insecure: true}
  resources: {gpu: 0, cpu: 250m, memory: 1Gi}
  scheduling:
    nodeSelector: {modelfleet.io/real-node: "true"}
    tolerations: [{key: modelfleet.io/real-node, operator: Exists, effect: NoSchedule}]
  cache: {size: 1Gi, storageClassName: local-path}
  serving:
    aliases: [gemma3]
    maxInFlightPerReplica: 2
    rateLimit: {requestsPerMinute: 600}
  autoscaling:
    enabled: true
    minReplicas: 1
    maxReplicas: 2
    targetQueueDepthPerReplica: 1
    scaleDownStabilizationSeconds: 30
EOF
}

# wait_listed ROUTER_URL API_KEY NAME: until the router's /v1/models lists the model (its pods find it
# through the InferenceModel and the model's EndpointSlice).
wait_listed() {
  local deadline=$((SECONDS + 60))
  until curl -fsS -H "Authorization: Bearer $2" "$1/v1/models" 2>/dev/null | grep -q "\"$3\""; do
    ((SECONDS < deadline)) || { echo "demo: the router pods did not pick up the InferenceModel $3" >&2; exit 1; }
    sleep 0.5
  done
}

# wait_ready SECONDS [NAME]: until the model is Ready, printing its phase as it changes.
wait_ready() {
  local deadline=$((SECONDS + $1)) name=${2:-gemma} phase="" now
  while :; do
    now=$(kubectl_ -n "$models_namespace" get inferencemodel.modelfleet.io "$name" \
      -o jsonpath='{.status.phase}: {.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null || true)
    if [[ "$now" != "$phase" ]]; then
      phase=$now
      echo "  $(date +%T) $phase"
    fi
    [[ "$now" == Ready:* ]] && return 0
    if ((SECONDS >= deadline)); then
      kubectl_ -n "$models_namespace" get pods,jobs,pvc -o wide >&2
      kubectl_ -n "$models_namespace" describe inferencemodel.modelfleet.io "$name" >&2
      echo "demo: the model did not become Ready" >&2
      exit 1
    fi
    sleep 1
  done
}

# The steps of `up`, each timed: step_done NAME closes the step that began at the previous one.
step_names=()
step_tenths=()
step_started=${EPOCHREALTIME/./}
script_started=$step_started
step_done() {
  local now=${EPOCHREALTIME/./}
  step_names+=("$1")
  step_tenths+=($(((now - step_started) / 100000)))
  step_started=$now
}

step_summary() {
  local i total=0 make_started
  echo "Durations of the demo's steps:"
  # `make demo` notes when it started (hack/plan.py), before installing what the demo needs: that part
  # is the first row. Read once, so that a later `hack/demo.sh up` run by hand never counts it again.
  make_started=$(cat "$demo_dir/make-started" 2>/dev/null || true)
  rm -f "$demo_dir/make-started"
  if [[ $make_started =~ ^[0-9]+$ ]] && ((make_started < script_started && script_started - make_started < 3 * 3600 * 1000000)); then
    step_names=("install" "${step_names[@]}")
    step_tenths=($(((script_started - make_started) / 100000)) "${step_tenths[@]}")
  fi
  for i in "${!step_names[@]}"; do
    printf '  %-16s %5d.%d s\n' "${step_names[$i]}" $((step_tenths[i] / 10)) $((step_tenths[i] % 10))
    total=$((total + step_tenths[i]))
  done
  printf '  %-16s %5d.%d s\n' total $((total / 10)) $((total % 10))
}

# next_steps ROUTER_URL API_KEY PROMPT: what to do next, ready to paste (the real address and user key).
next_steps() {
  local url=$1 key=$2 prompt=$3 kubectl_cmd
  kubectl_cmd="$repo_root/.cache/bin/kubectl --kubeconfig $repo_root/.cache/kubeconfig"
  cat <<EOF
== Next: paste any of these (the router's address and the demo's user key are filled in) ==

# A streamed chat through the router, raw SSE:
curl -sN $url/v1/chat/completions -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
  -d '{"model":"gemma","stream":true,"messages":[{"role":"user","content":"$prompt"}]}'

# The same with the openai SDK (installed in .venv):
$python - <<'PY'
from openai import OpenAI

client = OpenAI(base_url="$url/v1", api_key="$key")
stream = client.chat.completions.create(
    model="gemma", stream=True, messages=[{"role": "user", "content": "$prompt"}]
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)
print()
PY

# Watch the model's phase and replicas (in another terminal while demo-load runs):
$kubectl_cmd -n $models_namespace get inferencemodels -w

# In $repo_root:
make demo-load   # load gemma until its HPA scales it to 2 replicas on the router's queue, then back to 1
make demo-vllm   # a vLLM model beside it, served on CPU through the same router
make demo-down   # stop the cluster and everything it started
EOF
}

up() {
  echo "demo: 6 steps: the cluster (with its real node), the images, gemma3:270m pushed to the cluster's registry, the chart installed, the model Ready, a first streamed answer"
  "$repo_root/hack/cluster.sh" up demo
  echo
  echo "== Nodes of modelfleet-dev: fake kwok nodes for GPUs and scale, and one real node =="
  kubectl_ get nodes -o wide
  kubectl_ get nodes -o custom-columns='NODE:.metadata.name,GPU:.status.allocatable.nvidia\.com/gpu,CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory,TAINTS:.spec.taints[*].key'
  step_done cluster

  echo
  echo "== Images: built from Dockerfile.server and Dockerfile.operator, imported into the real node =="
  "$repo_root/hack/images.sh" build
  local archive
  for archive in "$repo_root"/.cache/images/*.tar; do "$repo_root/hack/node.sh" import "$archive"; done
  step_done images

  echo
  echo "== gemma3:270m in the cluster's OCI registry ($registry), put there with ollama push =="
  "$repo_root/hack/registry.sh" push
  step_done "registry push"

  echo
  echo "== The ModelFleet chart, installed for real on the real node (release $release in $namespace) =="
  install_chart
  local secret="$release-modelfleet-api-keys" api_key admin_key node_port
  api_key=$(kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.user-key}' | base64 -d)
  admin_key=$(kubectl_ -n "$namespace" get secret "$secret" -o jsonpath='{.data.admin-key}' | base64 -d)
  node_port=$(kubectl_ -n "$namespace" get service "$release-modelfleet-router" -o jsonpath='{.spec.ports[0].nodePort}')
  local router_url="http://$bridge_address:$node_port"
  step_done "chart install"

  echo
  echo "== A managed InferenceModel: the operator prefetches the weights, starts Ollama, warms it up =="
  apply_model
  wait_ready 600
  step_done "model Ready"
  kubectl_ -n "$models_namespace" get inferencemodels.modelfleet.io
  kubectl_ -n "$models_namespace" get pods,jobs,pvc,hpa -o wide
  echo "Start-up phases (seconds): $(kubectl_ -n "$models_namespace" get inferencemodel.modelfleet.io gemma -o jsonpath='{.status.timings}')"
  wait_listed "$router_url" "$api_key" gemma
  local model_url
  model_url="http://$(kubectl_ -n "$models_namespace" get service im-gemma -o jsonpath='{.spec.clusterIP}'):11434"
  mkdir -p "$demo_dir"
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
  echo "A streamed chat through the router's pods to the model's pod, as it arrives:"
  echo
  "$python" "$repo_root/hack/ollama_model.py" chat "$router_url/v1" "$prompt" gemma "$api_key"
  step_done "first answer"
  echo
  echo "The router ($router_url, a NodePort on the real node's bridge), the operator and Redis run as pods"
  echo "in $namespace; the model's pods, its prefetch Job, volume and HPA in $models_namespace. Ollama's own"
  echo "API, from this machine: curl \$MODEL_URL/api/tags (.cache/demo/env holds these values for \`source\`)."
  echo "Note: the packaged GGUF is Gemma 3 270M's base (pretrained) model: it continues text rather than following instructions, so chat answers are often off-topic. The serving path is what this shows."
  echo
  step_summary
  echo
  next_steps "$router_url" "$api_key" "$prompt"
}

# The vLLM model: vLLM's CPU build on the real node, its weights from the cluster's Hugging Face mirror.
# float32 (these cores have no bfloat16 arithmetic), eager (half the start time of a compiled graph),
# 10Gi because vLLM counts the pod's cached pages as used when it sizes its KV cache.
vllm() {
  [[ -f "$demo_dir/env" ]] || { echo "demo: run \`make demo\` first" >&2; exit 1; }
  local ROUTER_URL API_KEY
  ROUTER_URL=$(sed -n 's/^ROUTER_URL=//p' "$demo_dir/env")
  API_KEY=$(sed -n 's/^API_KEY=//p' "$demo_dir/env")
  echo "== The vLLM CPU image (Dockerfile.vllm-cpu), built once and imported into the real node =="
  "$repo_root/hack/images.sh" vllm
  local out="$repo_root/.cache/images/vllm-cpu" image
  image=$(awk '$1 == "vllmCpuImage:" { print $2 }' "$repo_root/charts/modelfleet/values.yaml")
  "$repo_root/hack/node.sh" import-once "$out/image.tar" "$image" "$(<"$out/image.key")"
  echo
  echo "== The cluster's Hugging Face endpoint (olah on $bridge_address:$hf_mirror_port), serving $hf_mirror_model =="
  "$repo_root/hack/hfmirror.sh" start
  echo
  echo "== A vLLM InferenceModel without a GPU: the operator gives it the vLLM CPU image =="
  kubectl_ apply -f - <<EOF
apiVersion: modelfleet.io/v1alpha1
kind: InferenceModel
metadata: {name: gemma-vllm, namespace: $models_namespace}
spec:
  runtime: vllm
  model: $hf_mirror_model
  source: {huggingFaceEndpoint: "http://$bridge_address:$hf_mirror_port"}
  resources: {gpu: 0, cpu: 500m, memory: 10Gi}
  scheduling:
    nodeSelector: {modelfleet.io/real-node: "true"}
    tolerations: [{key: modelfleet.io/real-node, operator: Exists, effect: NoSchedule}]
  cache: {size: 2Gi, storageClassName: local-path}
  engine:
    args: [--dtype, float32, --max-model-len, "2048", --enforce-eager, --enable-auto-tool-choice,
           --tool-call-parser, hermes, --tool-strict-level, parameter]
EOF
  wait_ready 900 gemma-vllm
  kubectl_ -n "$models_namespace" get inferencemodels.modelfleet.io
  echo "Start-up phases (seconds): $(kubectl_ -n "$models_namespace" get inferencemodel.modelfleet.io gemma-vllm -o jsonpath='{.status.timings}')"
  wait_listed "$ROUTER_URL" "$API_KEY" gemma-vllm
  echo
  echo "A streamed chat through the same router, now to vLLM:"
  echo
  "$python" "$repo_root/hack/ollama_model.py" chat "$ROUTER_URL/v1" "Write one sentence about lighthouses." gemma-vllm "$API_KEY"
  echo
  echo "Both models behind one router: curl -H \"Authorization: Bearer \$API_KEY\" \$ROUTER_URL/v1/models"
  echo "A forced tool call (vLLM's grammar makes even a base model call it):"
  echo "  source .cache/demo/env && curl \$ROUTER_URL/v1/chat/completions -H \"Authorization: Bearer \$API_KEY\" \\"
  echo "    -H 'Content-Type: application/json' -d '{\"model\":\"gemma-vllm\",\"temperature\":0,\"tool_choice\":\"required\",\"messages\":[{\"role\":\"user\",\"content\":\"Weather in Paris?\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\",\"maxLength\":40}},\"required\":[\"city\"]}}}]}'"
}

case "${1:-up}" in
  up) up ;;
  vllm) vllm ;;
  down) rm -f "$demo_dir/env"; "$repo_root/hack/cluster.sh" down ;;
  *) echo "usage: $0 up|vllm|down" >&2; exit 2 ;;
esac
