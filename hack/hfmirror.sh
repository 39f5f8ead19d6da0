#!/usr/bin/env bash
# The local cluster's Hugging Face endpoint: olah, a hub mirror, as a host process on the real node's
# bridge, plain HTTP, serving the repository modelfleet/gemma-3-270m (hack/vllm_model.py) that vLLM
# models download. A pod reaches it as HF_ENDPOINT=http://$bridge_address:$hf_mirror_port, as it
# would a mirror, Artifactory or Nexus in front of huggingface.co.
#
#   hack/hfmirror.sh start    prepare the repository (cached) and serve it (hack/node.sh down stops it)
#   hack/hfmirror.sh stop     stop it
#   hack/hfmirror.sh status   exit 0 if it answers
#
# olah runs offline: it serves only the local repositories, and never tries huggingface.co (which
# this machine cannot reach). Everything lives in .cache/hfmirror/: olah.toml, hfmirror.log (olah's
# log, with one line per request: tests count the weight downloads there) and the pid file.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cluster/network.env source-path=SCRIPTDIR
source "$repo_root/hack/cluster/network.env"
mirror_dir="$repo_root/.cache/hfmirror"
olah="$repo_root/.venv-olah/bin/olah-cli"
mirror_url="http://$bridge_address:$hf_mirror_port"

log() { printf 'hfmirror: %s\n' "$*" >&2; }
die() { printf 'hfmirror: error: %s\n' "$*" >&2; exit 1; }

state_dir=$mirror_dir
mkdir -p "$state_dir"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$repo_root/hack/lib.sh"

answers() { curl -fsS -o /dev/null --max-time 2 "$mirror_url/api/models/$hf_mirror_model/revision/main"; }

start() {
  [[ -x "$olah" ]] || die "no $olah (make install-hfmirror)"
  ip -4 addr show dev "$bridge" 2>/dev/null | grep -qF " $bridge_address/" ||
    die "the bridge $bridge with $bridge_address does not exist (hack/node.sh up makes it)"
  if pid_alive hfmirror && answers; then
    log "serving $mirror_url already"
    return 0
  fi
  local mirrors
  mirrors=$("$repo_root/.venv/bin/python" "$repo_root/hack/vllm_model.py" prepare)
  cat >"$mirror_dir/olah.toml" <<EOF
[basic]
host = "$bridge_address"
port = $hf_mirror_port
repos-path = "$mirror_dir/repos"
mirror-scheme = "http"
mirror-netloc = "$bridge_address:$hf_mirror_port"
mirror-lfs-netloc = "$bridge_address:$hf_mirror_port"
mirrors-path = ["$mirrors"]

[accessibility]
offline = true
EOF
  start_process hfmirror "$olah" -c "$mirror_dir/olah.toml"
  wait_for "olah answering at $mirror_url with $hf_mirror_model" 60 answers
  log "serving $mirror_url ($hf_mirror_model from $mirrors; log: $mirror_dir/hfmirror.log)"
}

case ${1:-} in
  start) start ;;
  stop) stop_process hfmirror ;;
  status) pid_alive hfmirror && answers ;;
  *) die "usage: $0 start|stop|status" ;;
esac
