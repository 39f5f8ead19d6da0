#!/usr/bin/env bash
# For users with a Docker engine: a kind cluster shaped like the local kwok cluster.
# ModelFleet's CI cannot run this (its machines have no Docker engine); it is kept simple so
# that it can be reviewed line by line.
#
#   hack/kind-up.sh          create (or reuse) the kind cluster modelfleet-kind, build and load the
#                            two images, helm install the chart, apply a sample InferenceModel
#   hack/kind-up.sh down     delete it
#
# Worker nodes cannot have real GPUs here, so the two "GPU" workers advertise nvidia.com/gpu
# as an extended resource (the documented way to advertise a node-level resource by hand),
# carry the GPU label and taint, and can schedule GPU-requesting pods that never use a GPU.
# Environment: KIND_NODE_IMAGE to pin the node image (default: kind's own default).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster_name=modelfleet-kind
kubeconfig="$repo_root/.cache/kind-kubeconfig"

command -v docker >/dev/null 2>&1 || { echo "kind-up: error: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "kind-up: error: no Docker engine answers (docker info failed)" >&2; exit 1; }

if command -v kind >/dev/null 2>&1; then
  kind_bin=$(command -v kind)
else
  python3 "$repo_root/hack/build_tools.py" kind
  kind_bin="$repo_root/.cache/bin/kind"
fi
python3 "$repo_root/hack/build_tools.py" kubectl
kubectl_() { "$repo_root/.cache/bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

if [[ "${1:-up}" == "down" ]]; then
  "$kind_bin" delete cluster --name "$cluster_name"
  rm -f "$kubeconfig"
  exit 0
fi

mkdir -p "$repo_root/.cache"
if ! "$kind_bin" get clusters 2>/dev/null | grep -qx "$cluster_name"; then
  image_args=()
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then image_args=(--image "$KIND_NODE_IMAGE"); fi
  "$kind_bin" create cluster --name "$cluster_name" "${image_args[@]}" --kubeconfig "$kubeconfig" --wait 180s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {nvidia.com/gpu.present: "true", modelfleet.io/fake-gpu: "true"}
  - role: worker
    labels: {nvidia.com/gpu.present: "true", modelfleet.io/fake-gpu: "true"}
  - role: worker
EOF
else
  "$kind_bin" get kubeconfig --name "$cluster_name" >"$kubeconfig"
fi

for node in $(kubectl_ get nodes -l modelfleet.io/fake-gpu=true -o name); do
  kubectl_ taint "$node" nvidia.com/gpu=present:NoSchedule --overwrite >/dev/null
  kubectl_ patch "$node" --subresource=status --type=json \
    -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]' >/dev/null
done

kubectl_ get nodes -o custom-columns='NAME:.metadata.name,GPU:.status.allocatable.nvidia\.com/gpu,TAINTS:.spec.taints[*].key'
echo "kind-up: kubeconfig in $kubeconfig"

# The images, built from this checkout and loaded into the nodes (no registry involved).
tag=dev
docker build -f "$repo_root/Dockerfile.operator" -t "ghcr.io/modelfleet/operator:$tag" "$repo_root"
docker build -f "$repo_root/Dockerfile.server" -t "ghcr.io/modelfleet/router:$tag" "$repo_root"
"$kind_bin" load docker-image --name "$cluster_name" "ghcr.io/modelfleet/operator:$tag" "ghcr.io/modelfleet/router:$tag"

python3 "$repo_root/hack/build_tools.py" helm
"$repo_root/.cache/bin/helm" --kubeconfig "$kubeconfig" upgrade --install modelfleet "$repo_root/charts/modelfleet" \
  --namespace modelfleet-system --create-namespace --wait --timeout 5m \
  --set operator.image.tag="$tag" --set operator.image.pullPolicy=Never \
  --set router.image.tag="$tag" --set router.image.pullPolicy=Never
"$repo_root/.cache/bin/helm" --kubeconfig "$kubeconfig" test modelfleet --namespace modelfleet-system

kubectl_ apply -f "$repo_root/manifests/samples/ollama-gpu.yaml"
kubectl_ get inferencemodels.modelfleet.io -A
echo "kind-up: the router: kubectl --kubeconfig $kubeconfig -n modelfleet-system port-forward svc/modelfleet-router 8000:80"
echo "kind-up: its API key: kubectl --kubeconfig $kubeconfig -n modelfleet-system get secret modelfleet-api-keys -o jsonpath='{.data.user-key}' | base64 -d"
