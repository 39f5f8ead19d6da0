#!/usr/bin/env bash
# Debian packages: what the tests run for real (Redis, Prometheus with promtool), shellcheck,
# the real node and the image builds (see below), and what building Ollama needs (cmake, a C++ compiler, objdump, and the nlohmann-json and stb
# headers that Go module zips leave out of llama.cpp's vendor/ tree).
# Installs only what is missing, with one `apt-get update` first.
set -euo pipefail

# package:path-that-proves-it-is-installed
wanted=(
  redis-server:/usr/bin/redis-server
  prometheus:/usr/bin/promtool
  shellcheck:/usr/bin/shellcheck
  cmake:/usr/bin/cmake
  g++:/usr/bin/g++
  binutils:/usr/bin/objdump
  nlohmann-json3-dev:/usr/include/nlohmann/json_fwd.hpp
  libstb-dev:/usr/include/stb/stb_image.h
  # The local cluster's real node (hack/node.sh): container runtime, CNI plugins, kube-proxy's
  # nftables, the API server relay, and the pause image's static build.
  containerd:/usr/bin/containerd
  runc:/usr/sbin/runc
  containernetworking-plugins:/usr/lib/cni/bridge
  nftables:/usr/sbin/nft
  iptables:/usr/sbin/iptables
  conntrack:/usr/sbin/conntrack
  # kube-router, the NetworkPolicy enforcer, keeps the policies' address sets in ipsets.
  ipset:/usr/sbin/ipset
  iproute2:/usr/sbin/ip
  socat:/usr/bin/socat
  libc6-dev:/usr/lib/x86_64-linux-gnu/libc.a
  # Images without a Docker engine (hack/images.sh): buildah builds, podman inspects, debootstrap
  # makes the stand-in base images' root filesystem.
  buildah:/usr/bin/buildah
  podman:/usr/bin/podman
  debootstrap:/usr/sbin/debootstrap
)

packages=()
missing=()
for entry in "${wanted[@]}"; do
  packages+=("${entry%%:*}")
  [[ -e "${entry#*:}" ]] || missing+=("${entry%%:*}")
done
# --missing: only name what is missing, one per line (hack/plan.py reads it), and install nothing.
if [[ "${1:-}" == --missing ]]; then
  ((${#missing[@]} == 0)) || printf '%s\n' "${missing[@]}"
  exit 0
fi
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
