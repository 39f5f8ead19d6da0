#!/usr/bin/env bash
# Debian packages the tests run for real: Redis, Prometheus (with promtool) and shellcheck.
# Installs only what is missing, with one `apt-get update` first.
set -euo pipefail

packages=(redis-server prometheus shellcheck)
commands=(redis-server promtool shellcheck)

missing=()
for i in "${!packages[@]}"; do
  command -v "${commands[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
if ((${#missing[@]} == 0)); then
  echo "system deps: all present (${packages[*]})"
  exit 0
fi

sudo_=()
if ((EUID != 0)); then
  command -v sudo >/dev/null 2>&1 || { echo "error: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo_=(sudo)
fi
echo "system deps: installing ${missing[*]}"
"${sudo_[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's packages may start their services; tests start their own servers on free ports.
for service in redis-server prometheus; do
  if command -v service >/dev/null 2>&1; then "${sudo_[@]}" service "$service" stop >/dev/null 2>&1 || true; fi
done
