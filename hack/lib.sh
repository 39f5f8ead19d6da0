# Host processes of the local cluster, shared by hack/node.sh, hack/registry.sh, hack/monitoring.sh
# and hack/ingress.sh.
# Each process runs in its own session with a pid file and a log in $state_dir (which the sourcing
# script sets, with its own die()), and is stopped by that pid.
# shellcheck shell=bash
: "${state_dir:?the sourcing script sets state_dir}"

pid_alive() { [[ -f "$state_dir/$1.pid" ]] && kill -0 "$(cat "$state_dir/$1.pid")" 2>/dev/null; }

# start_process NAME ARGV...: run ARGV unless NAME runs already; its output goes to $state_dir/NAME.log.
# start_process --stdout FILE NAME ARGV...: its stdout (an access log, say) goes to FILE instead.
start_process() {
  local stdout=""
  if [[ $1 == --stdout ]]; then
    stdout=$2
    shift 2
  fi
  local name=$1
  shift
  pid_alive "$name" && return 0
  local log="$state_dir/$name.log"
  setsid "$@" >>"${stdout:-$log}" 2>>"$log" </dev/null &
  echo $! >"$state_dir/$name.pid"
}

# stop_process NAME: SIGTERM, up to 20 s to exit, then SIGKILL.
stop_process() {
  local name=$1 pid
  [[ -f "$state_dir/$name.pid" ]] || return 0
  pid=$(cat "$state_dir/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$state_dir/$name.pid"
}

# wait_for WHAT SECONDS ARGV...: until ARGV succeeds, or die saying WHAT did not happen.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not happen within ${seconds}s (logs in $state_dir)"
    sleep 0.2
  done
}
