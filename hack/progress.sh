# shellcheck shell=bash
# A live line for a long step of the first run, sourced by the scripts that have one.
#
# with_progress LABEL SECONDS ARGV...: run ARGV (its output should go to a log: the line shares the
# screen). Meanwhile say how long LABEL has run against about SECONDS (0: no estimate): rewritten
# every second on a terminal, a plain line a minute otherwise, so that a log or CI keeps whole lines.
# Returns ARGV's status.
with_progress() {
  local label=$1 expected=$2
  shift 2
  local started=$SECONDS tty=0 printed=0 elapsed line status=0
  [[ -t 1 ]] && tty=1
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    # A tenth of a second between looks: the step's end is noticed at once, the line changes each second.
    sleep 0.1
    elapsed=$((SECONDS - started))
    ((elapsed > printed)) || continue
    line="  $label: $(progress_duration "$elapsed")"
    ((expected > 0)) && line+=" of about $(progress_duration "$expected")"
    if ((tty)); then
      printf '\r\033[K%s' "$line"
      printed=$elapsed
    elif ((elapsed - printed >= 60)); then
      printf '%s\n' "$line"
      printed=$elapsed
    fi
  done
  wait "$pid" || status=$?
  ((tty)) && printf '\r\033[K'
  return "$status"
}

# progress_duration SECONDS: 45s, or 3m05s.
progress_duration() {
  if (($1 >= 60)); then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi
}
