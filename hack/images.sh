#!/usr/bin/env bash
# Build the container images with buildah, on a machine with no Docker engine and no reachable
# container registry.  Dockerfile.server and Dockerfile.operator are built as they are; only the
# images they start FROM (and the other images the cluster runs) are made here, from Debian.
#
#   hack/images.sh base    # stand-in base images, built once per recipe and cached by content
#   hack/images.sh build   # base, then the router and operator images (rebuilt only when what
#                          # they are built from changed) and the archives of all five images
#   hack/images.sh vllm    # the vLLM CPU image (Dockerfile.vllm-cpu), built once per content of
#                          # hack/vllm/ and cached as an archive; .cache/images/vllm-cpu/image.tar links it
#   hack/images.sh list    # the archives in .cache/images/ and their sizes
#
# The stand-ins carry the official names, so `FROM python:3.11-slim-bookworm` and the chart's
# image references resolve from local storage with no pull:
#   docker.io/library/python:3.11-slim-bookworm  Debian's python3.11 + pip on debootstrap minbase
#   docker.io/library/redis:<chart's tag>        Debian's redis-server (values.yaml redis.image)
#   docker.io/ollama/ollama:<chart's tag>        the Ollama built by hack/build_tools.py (CPU only)
# Nothing is pulled from or pushed to any registry.
#
# Environment:
#   MODELFLEET_IMAGES_CACHE  where the debootstrap rootfs and the base image archives are kept
#                            (default ~/.cache/modelfleet/images)
#   MODELFLEET_TOOLS_CACHE   where hack/build_tools.py keeps Ollama (only to find it; see below)
#   MODELFLEET_STORAGE_DRIVER=vfs  force the vfs fallback store (see use_storage)
#
# Root is required: debootstrap, and buildah mount/run with the system containers-storage.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${MODELFLEET_IMAGES_CACHE:-$HOME/.cache/modelfleet/images}
OUT_DIR=$REPO_ROOT/.cache/images
CHART_DIR=$REPO_ROOT/charts/modelfleet
VALUES=$CHART_DIR/values.yaml

SUITE=bookworm
VARIANT=minbase
ARCH=$(dpkg --print-architecture)

# Debian packages of each stand-in (on top of minbase; minbase already has passwd, i.e. useradd).
PYTHON_PACKAGES=(ca-certificates netbase tzdata python3.11 python3.11-venv python3-pip)
REDIS_PACKAGES=(redis-server)
OLLAMA_PACKAGES=(ca-certificates)

PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

# Working containers to remove if the script stops half-way.
WORKING_CONTAINERS=()

log() { printf '%s\n' "images: $*"; }
# shellcheck source=progress.sh source-path=SCRIPTDIR
source "$REPO_ROOT/hack/progress.sh"
# Seconds the long steps took on a first run here (2 cores; 21 s and 13-16 s measured): the live line's estimate.
DEBOOTSTRAP_SECONDS=25
BUD_SECONDS=20
die() {
    printf '%s\n' "images: error: $*" >&2
    exit 1
}

now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }

human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }

cleanup() {
    local ctr
    for ctr in "${WORKING_CONTAINERS[@]}"; do
        buildah umount "$ctr" >/dev/null 2>&1 || true
        buildah rm "$ctr" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

sha256() { sha256sum | cut -c1-16; }

# --- storage --------------------------------------------------------------------------------

# Overlay works on this kind of machine (ext4, kernel overlayfs, root: `buildah info` reports
# GraphDriverName overlay with "Native Overlay Diff": "true"), so the system store
# /var/lib/containers/storage is used as it is and podman sees the same images.  Where the kernel
# cannot mount overlayfs (or MODELFLEET_STORAGE_DRIVER=vfs), a separate vfs store under the cache
# dir is used instead, through a storage.conf that CONTAINERS_STORAGE_CONF points to; a separate
# store because containers-storage refuses to switch the driver of an existing one.  podman must
# then be run with the same CONTAINERS_STORAGE_CONF to see the images (the script says so).
use_storage() {
    local driver=${MODELFLEET_STORAGE_DRIVER:-}
    if [[ -z $driver ]]; then
        driver=vfs
        local probe
        probe=$(mktemp -d)
        mkdir -p "$probe"/{lower,upper,work,merged}
        if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
            "$probe/merged" 2>/dev/null; then
            umount "$probe/merged"
            driver=overlay
        fi
        rm -rf "$probe"
    fi
    if [[ $driver == vfs ]]; then
        local conf=$CACHE_DIR/storage-vfs.conf
        mkdir -p "$CACHE_DIR/storage-vfs"
        cat >"$conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$CACHE_DIR/storage-vfs"
runroot = "/run/modelfleet-containers-vfs"
EOF
        export CONTAINERS_STORAGE_CONF=$conf
        log "storage: vfs in $CACHE_DIR/storage-vfs (run podman with CONTAINERS_STORAGE_CONF=$conf)"
    else
        log "storage: $driver (the system store, shared with podman)"
    fi
    # buildah and podman refuse to use an image without a signature policy.  Debian's
    # containers-common ships this file; write the same default if a machine lacks it.
    if [[ ! -e /etc/containers/policy.json ]]; then
        mkdir -p /etc/containers
        printf '%s\n' '{"default": [{"type": "insecureAcceptAnything"}]}' >/etc/containers/policy.json
        log "wrote the default /etc/containers/policy.json"
    fi
}

# --- Debian mirror --------------------------------------------------------------------------

# The first URI that apt of this machine uses for a suite (component main), from one-line
# sources.list files or deb822 .sources files, in apt's reading order.
apt_uri_for_suite() {
    local suite=$1 file uri
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] || continue
        if [[ $file == *.sources ]]; then
            uri=$(awk -v s="$suite" '
                BEGIN { RS = "" }
                {
                    n = split($0, lines, "\n"); types = ""; uris = ""; suites = ""; comps = ""; enabled = "yes"
                    for (j = 1; j <= n; j++) {
                        line = lines[j]
                        if (line ~ /^#/) continue
                        key = tolower(line); sub(/:.*/, "", key); value = line; sub(/^[^:]*:[ \t]*/, "", value)
                        if (key == "types") types = value
                        else if (key == "uris") uris = value
                        else if (key == "suites") suites = value
                        else if (key == "components") comps = value
                        else if (key == "enabled") enabled = tolower(value)
                    }
                    if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " s " ") \
                        && (" " comps " ") ~ / main /) { split(uris, u, " "); print u[1]; exit }
                }' "$file")
        else
            uri=$(awk -v s="$suite" '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == s) { for (k = i + 2; k <= NF; k++) if ($k == "main") { print $i; exit } }
                }' "$file")
        fi
        if [[ -n $uri ]]; then
            printf '%s\n' "${uri%/}"
            return 0
        fi
    done
    return 1
}

MIRROR=$(apt_uri_for_suite "$SUITE" || echo http://deb.debian.org/debian)
SECURITY_MIRROR=$(apt_uri_for_suite "$SUITE-security" || echo http://deb.debian.org/debian-security)

# --- the debootstrap rootfs (shared by every stand-in) --------------------------------------

# What the rootfs tarball holds besides debootstrap's own result: apt sources in the deb822 form
# of the official Debian images (suite, -updates, -security), and the dpkg/apt settings of
# debian:*-slim (no docs, man pages, translations or apt caches).
recipe_rootfs() {
    local root=$1
    rm -f "$root/etc/apt/sources.list" "$root/etc/hostname" "$root/etc/resolv.conf"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf '%s\n' 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf '%s\n' 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    slim_rootfs "$root"
}

# Docs, man pages, apt lists and caches, logs: what debian:*-slim leaves out.
slim_rootfs() {
    local root=$1
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
        "$root"/var/lib/dpkg/*-old "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*
    mkdir -p "$root/var/lib/apt/lists/partial" "$root/var/cache/apt/archives/partial"
}

rootfs_key() {
    {
        declare -f recipe_rootfs slim_rootfs
        printf '%s\n' "$SUITE" "$VARIANT" "$ARCH" "$MIRROR" "$SECURITY_MIRROR" "$(debootstrap --version)"
    } | sha256
}

# The rootfs tarball: debootstrap once, then reused by every recipe.
ensure_rootfs() {
    ROOTFS=$CACHE_DIR/rootfs-$SUITE-$VARIANT-$ARCH-$(rootfs_key).tar.gz
    if [[ -s $ROOTFS ]]; then
        log "rootfs: cached $ROOTFS"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local started tmp
    started=$(now)
    tmp=$(mktemp -d "$CACHE_DIR/debootstrap.XXXXXX")
    log "rootfs: debootstrap --variant=$VARIANT $SUITE from $MIRROR ..."
    if ! with_progress "rootfs: debootstrap" "$DEBOOTSTRAP_SECONDS" \
        debootstrap --variant="$VARIANT" --arch="$ARCH" "$SUITE" "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1; then
        tail -n 20 "$tmp/debootstrap.log" >&2
        rm -rf "$tmp"
        die "debootstrap failed"
    fi
    log "rootfs: debootstrap took $(since "$started")"
    recipe_rootfs "$tmp/rootfs"
    # /dev, /proc, /sys and /run are the runtime's: kept as empty directories.
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$tmp/rootfs" \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' \
        -czf "$ROOTFS.partial" .
    rm -rf "$tmp"
    rm -f "$CACHE_DIR/rootfs-$SUITE-$VARIANT-$ARCH-"*.tar.gz
    mv "$ROOTFS.partial" "$ROOTFS"
    log "rootfs: $(human "$(stat -c %s "$ROOTFS")") in $(since "$started") -> $ROOTFS"
}

# --- stand-in recipes -----------------------------------------------------------------------
# Each recipe gets a working container holding the rootfs (and its mount point) and finishes it.

in_ctr() {
    local ctr=$1
    shift
    buildah run --network host "$ctr" -- sh -ec "$*"
}

apt_install() {
    local ctr=$1
    shift
    # policy-rc.d: no service is started while packages are installed.
    in_ctr "$ctr" "printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get upgrade -qq -y >/dev/null
        apt-get install -qq -y --no-install-recommends $* >/dev/null
        rm -f /usr/sbin/policy-rc.d" 2> >(grep -v '^debconf: delaying package configuration' >&2)
}

# python:3.11-slim-bookworm: python, python3, python3.11, pip, pip3 in /usr/local/bin, `pip
# install` as root allowed (no EXTERNALLY-MANAGED marker, and dpkg never unpacks it again).
recipe_python() {
    local ctr=$1 root=$2
    printf '%s\n' 'path-exclude /usr/lib/python3*/EXTERNALLY-MANAGED' >"$root/etc/dpkg/dpkg.cfg.d/python-pip-as-root"
    apt_install "$ctr" "${PYTHON_PACKAGES[@]}"
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    local name
    for name in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$name"; done
    for name in pip pip3 pip3.11; do ln -sf /usr/bin/pip3 "$root/usr/local/bin/$name"; done
    local version
    version=$(in_ctr "$ctr" "dpkg-query -W -f '\${Version}' python3.11")
    version=${version%%-*}
    [[ $version == 3.11.* ]] || die "python3.11 of $SUITE is $version"
    buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --env PYTHON_VERSION="$version" --cmd '["python3"]' "$ctr"
}

# redis:<tag>: redis-server and redis-cli on PATH, WORKDIR /data, the official entrypoint's
# behaviour (options alone run redis-server; as root it drops to the redis user, with setpriv
# instead of gosu).  Any UID can run it: nothing is written outside /data.
recipe_redis() {
    local ctr=$1 root=$2 tag=$3
    apt_install "$ctr" "${REDIS_PACKAGES[@]}"
    local version
    version=$(in_ctr "$ctr" "dpkg-query -W -f '\${Version}' redis-server")
    version=${version#*:}
    version=${version%%-*}
    [[ $tag == "$version" || $tag == "$version"-* ]] ||
        die "redis-server of $SUITE is $version, but values.yaml redis.image.tag is $tag; set it to $version-$SUITE"
    install -d -m 0755 "$root/data"
    in_ctr "$ctr" "chown redis:redis /data"
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
# first arg is `-f` or `--some-option`, or `something.conf`: run redis-server with it
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
# started as root: own /data's files, then run as the redis user
if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
um="$(umask)"
if [ "$um" = '0022' ]; then
    umask 0077
fi
exec "$@"
EOF
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
    buildah config --env REDIS_VERSION="$version" --workingdir /data --volume /data --port 6379 \
        --entrypoint '["docker-entrypoint.sh"]' --cmd '["redis-server"]' "$ctr"
}

# ollama/ollama:<tag>: /usr/bin/ollama and its CPU runner libraries in /usr/lib/ollama (the
# binary looks for them in ../lib/ollama), as in the official image.
recipe_ollama() {
    local ctr=$1 root=$2
    apt_install "$ctr" "${OLLAMA_PACKAGES[@]}"
    install -m 0755 "$OLLAMA_BIN" "$root/usr/bin/ollama"
    mkdir -p "$root/usr/lib/ollama"
    cp -a "$OLLAMA_LIB/." "$root/usr/lib/ollama/"
    buildah config --env OLLAMA_HOST=0.0.0.0:11434 --port 11434 \
        --entrypoint '["/bin/ollama"]' --cmd '["serve"]' "$ctr"
}

# --- cached stand-in images -----------------------------------------------------------------

image_id() { podman image inspect --format "{{.Id}}" "$1" 2>/dev/null; }
image_label() { buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null; }
image_size() { podman image inspect --format '{{.Size}}' "$1"; }

# ensure_base NAME KEY RECIPE [ARGS]: the image NAME in local storage, from its archive
# CACHE_DIR/<name>-KEY.tar, which is built by RECIPE when missing.
ensure_base() {
    local name=$1 key=$2 recipe=$3
    shift 3
    local slug=${name//[\/:]/_}
    local archive=$CACHE_DIR/$slug-$key.tar started
    started=$(now)
    if [[ $(image_label "$name" io.modelfleet.recipe) == "$key" ]]; then
        log "$name: in local storage (recipe $key)"
        if [[ ! -s $archive ]]; then
            buildah push --quiet "$name" "docker-archive:$archive.partial:$name" >/dev/null
            mv "$archive.partial" "$archive"
            log "$name: archive rewritten from local storage -> $archive"
        fi
    elif [[ -s $archive ]]; then
        podman load --quiet -i "$archive" >/dev/null
        log "$name: loaded $archive in $(since "$started")"
    else
        ensure_rootfs
        log "$name: building (recipe $key) ..."
        local ctr mnt
        ctr=$(buildah from --name "modelfleet-base-$slug-$$" scratch)
        WORKING_CONTAINERS+=("$ctr")
        mnt=$(buildah mount "$ctr")
        tar --numeric-owner --xattrs --xattrs-include='*' -xzf "$ROOTFS" -C "$mnt"
        # Debian's default PATH, as in the official debian images (a recipe may set its own).
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
        "$recipe" "$ctr" "$mnt" "$@"
        slim_rootfs "$mnt"
        buildah umount "$ctr" >/dev/null
        buildah config --os linux --arch "$ARCH" \
            --label io.modelfleet.recipe="$key" \
            --label io.modelfleet.stand-in="built by hack/images.sh from Debian $SUITE, not the official image" \
            "$ctr"
        buildah commit --quiet --rm "$ctr" "$name" >/dev/null
        WORKING_CONTAINERS=()
        rm -f "$CACHE_DIR/$slug-"*.tar
        buildah push --quiet "$name" "docker-archive:$archive.partial:$name" >/dev/null
        mv "$archive.partial" "$archive"
        log "$name: built in $(since "$started"), $(human "$(image_size "$name")") -> $archive"
    fi
    BASE_ARCHIVES[$name]=$archive
}

recipe_key() {
    local recipe=$1
    shift
    {
        declare -f "$recipe" apt_install in_ctr slim_rootfs ensure_base
        printf '%s\n' "$(rootfs_key)" "$SUITE" "$@"
    } | sha256
}

# values.yaml: the first "<key>: value" under a top-level section (indentation-based; the file's
# own layout).
chart_value() {
    local section=$1 key=$2
    awk -v sec="$section:" -v key="$key:" '
        /^[^ #]/ { top = $1 }
        top == sec && $1 == key { v = $2; gsub(/"/, "", v); print v; exit }' "$VALUES"
}

# Where hack/build_tools.py keeps Ollama: .cache/bin/ollama links to <tools cache>/ollama/<v>/bin/ollama,
# with the runner libraries in <v>/lib/ollama.
find_ollama() {
    OLLAMA_BIN=$(readlink -f "$REPO_ROOT/.cache/bin/ollama" 2>/dev/null || true)
    if [[ ! -x $OLLAMA_BIN ]]; then
        local tools=${MODELFLEET_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelfleet/tools}
        local version
        version=$(sed -n 's/^OLLAMA_VERSION=//p' "$REPO_ROOT/hack/versions.env")
        OLLAMA_BIN=$tools/ollama/$version/bin/ollama
    fi
    [[ -x $OLLAMA_BIN ]] || die "no Ollama build (.cache/bin/ollama); run \`make tools\` (hack/build_tools.py) first"
    OLLAMA_LIB=$(dirname "$(dirname "$OLLAMA_BIN")")/lib/ollama
    [[ -d $OLLAMA_LIB ]] || die "Ollama's runner libraries are missing: $OLLAMA_LIB"
}

ollama_digest() {
    {
        sha256sum "$OLLAMA_BIN" | cut -d' ' -f1
        (cd "$OLLAMA_LIB" && find . \( -type f -o -type l \) -printf '%p %l\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    } | sha256
}

declare -A BASE_ARCHIVES=()
RUN_OPTS=()
REDIS_IMAGE=
OLLAMA_IMAGE=

cmd_base() {
    mkdir -p "$CACHE_DIR"
    # One run at a time per cache (a second one waits).
    exec 9>"$CACHE_DIR/.lock"
    flock 9
    use_storage
    log "Debian $SUITE from $MIRROR (security: $SECURITY_MIRROR)"
    local started
    started=$(now)

    ensure_base "$PYTHON_IMAGE" "$(recipe_key recipe_python "${PYTHON_PACKAGES[@]}")" recipe_python

    REDIS_IMAGE=$(chart_value redis repository):$(chart_value redis tag)
    local redis_tag=${REDIS_IMAGE##*:}
    ensure_base "$REDIS_IMAGE" "$(recipe_key recipe_redis "${REDIS_PACKAGES[@]}" "$redis_tag")" recipe_redis "$redis_tag"

    OLLAMA_IMAGE=$(chart_value operator ollamaImage)
    find_ollama
    ensure_base "$OLLAMA_IMAGE" "$(recipe_key recipe_ollama "${OLLAMA_PACKAGES[@]}" "$(ollama_digest)")" recipe_ollama

    log "base images ready in $(since "$started")"
}

# --- the project's images -------------------------------------------------------------------

# An archive `ctr -n k8s.io images import` accepts: docker-archive (docker save's format), with
# the full image name in its RepoTags.  Rewritten only when the image changed.
save_archive() {
    local name=$1 archive=$OUT_DIR/${1//[\/:]/_}.tar started id
    started=$(now)
    id=$(image_id "$name")
    if [[ -s $archive && -f $archive.id && $(<"$archive.id") == "$id" ]]; then
        log "$name: archive current $archive"
        return
    fi
    rm -f "$archive" "$archive.id"
    if [[ -n ${BASE_ARCHIVES[$name]:-} ]]; then
        # The cached archive is this very image: link it (or copy it to another filesystem).
        ln -f "${BASE_ARCHIVES[$name]}" "$archive" 2>/dev/null || cp "${BASE_ARCHIVES[$name]}" "$archive"
    else
        buildah push --quiet "$name" "docker-archive:$archive.partial:$name" >/dev/null
        mv "$archive.partial" "$archive"
    fi
    printf '%s\n' "$id" >"$archive.id"
    log "$name: archive $(human "$(stat -c %s "$archive")") in $(since "$started") -> $archive"
}

# What a build of DOCKERFILE reads: the Dockerfile, .dockerignore, the files the context sends
# (the `!` lines of the whitelist-style .dockerignore, minus __pycache__ and *.pyc), the
# stand-in base's image ID and buildah's version.
build_inputs_key() {
    local dockerfile=$1 paths=()
    mapfile -t paths < <(sed -n 's|^!||p' "$REPO_ROOT/.dockerignore" | sed 's|/$||')
    [[ $(sed -n '/^[^#]/{p;q}' "$REPO_ROOT/.dockerignore") == '*' && ${#paths[@]} -gt 0 ]] ||
        die ".dockerignore is no longer a whitelist (\`*\` then \`!path\` lines); teach build_inputs_key what the context holds"
    (
        buildah --version
        image_id "$PYTHON_IMAGE"
        cd "$REPO_ROOT"
        sha256sum "$dockerfile" .dockerignore
        find "${paths[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    ) | sha256
}

# buildah bud DOCKERFILE -> NAME, unless NAME already carries the key of the same inputs.
#
# Not --layers: buildah 1.28's layer cache is wrong for these Dockerfiles' final stage,
# `RUN --mount=type=bind,from=builder,... pip install`:
#  - the step's cache key is its text only, not the builder stage's content, so after a change in
#    operator/ or server/ the builder rebuilds the wheels but the final stage's pip install comes
#    from the cache and the image keeps the old code (BuildKit keys it on the mounted content);
#  - when the builder stage is entirely cached and that step is not, the mount is empty:
#    `couldn't find ".../overlay/<id>/merged/wheels" on host to bind mount into container`, and pip
#    fails with "No matching distribution found for modelfleet[server]==0.1.0".
# So an image is rebuilt whole (both stages) when any input changed, and not at all otherwise.
build_component() {
    local dockerfile=$1 name=$2 build_log=$3 key old
    key=$(build_inputs_key "$dockerfile")
    if [[ $(image_label "$name" io.modelfleet.inputs) == "$key" ]]; then
        log "$name: current (inputs $key), not rebuilt"
        return
    fi
    old=$(image_id "$name" || true)
    log "$name: buildah bud --pull=never -f $dockerfile (inputs $key, log: $build_log) ..."
    if ! with_progress "$name: buildah bud" "$BUD_SECONDS" \
        buildah bud --layers=false --force-rm --pull=never "${RUN_OPTS[@]}" --label io.modelfleet.inputs="$key" \
        -f "$REPO_ROOT/$dockerfile" -t "$name" "$REPO_ROOT" >"$build_log" 2>&1; then
        tail -n 30 "$build_log" >&2
        die "buildah bud -f $dockerfile failed (full log: $build_log)"
    fi
    # The image it replaces (now untagged) is of no further use.
    if [[ -n $old && $old != "$(image_id "$name")" ]]; then
        buildah rmi "$old" >/dev/null 2>&1 || true
    fi
}

cmd_build() {
    cmd_base
    local version
    version=$(awk '/^appVersion:/ { v = $2; gsub(/"/, "", v); print v }' "$CHART_DIR/Chart.yaml")
    [[ -n $version ]] || die "no appVersion in $CHART_DIR/Chart.yaml"

    # RUN steps use the host's network (pip reaches PyPI as the host does) and, read-only, the
    # host's CA bundle: this machine's egress proxy re-signs TLS with a CA only the host trusts.
    # Neither ends up in the image.
    RUN_OPTS=(--network host)
    if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
        RUN_OPTS+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    fi

    mkdir -p "$OUT_DIR"
    local built=() dockerfile component name started
    for dockerfile in Dockerfile.server:router Dockerfile.operator:operator; do
        component=${dockerfile#*:}
        dockerfile=${dockerfile%%:*}
        name=$(chart_value "$component" repository):$version
        started=$(now)
        build_component "$dockerfile" "$name" "$OUT_DIR/$component.build.log"
        log "$name: ready in $(since "$started"), $(human "$(image_size "$name")")"
        built+=("$name")
    done

    # The Python stand-in too: the local-path provisioner's helper pods run it on the real node.
    for name in "${built[@]}" "$REDIS_IMAGE" "$OLLAMA_IMAGE" "$PYTHON_IMAGE"; do
        save_archive "$name"
    done
    log "images (size in local storage, uncompressed):"
    for name in "${built[@]}" "$PYTHON_IMAGE" "$REDIS_IMAGE" "$OLLAMA_IMAGE"; do
        printf '  %-10s %s\n' "$(human "$(image_size "$name")")" "$name"
    done
    log "archives for \`ctr -n k8s.io images import <archive>\`:"
    cmd_list
}

# The vLLM CPU image: several GB, needed only by vLLM models, so built apart from `build` (whose
# archives every e2e run imports) and cached across clones in CACHE_DIR, keyed by its inputs.
cmd_vllm() {
    mkdir -p "$CACHE_DIR" "$OUT_DIR/vllm-cpu"
    exec 9>"$CACHE_DIR/.lock"
    flock 9
    use_storage
    ensure_base "$PYTHON_IMAGE" "$(recipe_key recipe_python "${PYTHON_PACKAGES[@]}")" recipe_python
    local name key archive started
    name=$(chart_value operator vllmCpuImage)
    [[ -n $name ]] || die "no operator.vllmCpuImage in $VALUES"
    key=$(
        buildah --version
        image_id "$PYTHON_IMAGE"
        cd "$REPO_ROOT" && sha256sum Dockerfile.vllm-cpu hack/vllm/requirements.txt hack/vllm/overrides.txt
    )
    key=$(sha256 <<<"$key")
    archive=$CACHE_DIR/vllm-cpu-$key.tar
    started=$(now)
    if [[ -s $archive ]]; then
        log "$name: current (inputs $key), not rebuilt: $archive"
    else
        local uv_cache=${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}
        mkdir -p "$uv_cache"
        RUN_OPTS=(--network host --volume "$uv_cache:/root/.cache/uv")
        if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
            RUN_OPTS+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
        fi
        log "$name: buildah bud -f Dockerfile.vllm-cpu hack/vllm (inputs $key; about 3 minutes, log: $OUT_DIR/vllm-cpu/build.log) ..."
        if ! buildah bud --layers=false --force-rm --pull=never "${RUN_OPTS[@]}" --label io.modelfleet.inputs="$key" \
            -f "$REPO_ROOT/Dockerfile.vllm-cpu" -t "$name" "$REPO_ROOT/hack/vllm" >"$OUT_DIR/vllm-cpu/build.log" 2>&1; then
            tail -n 30 "$OUT_DIR/vllm-cpu/build.log" >&2
            die "buildah bud -f Dockerfile.vllm-cpu failed (full log: $OUT_DIR/vllm-cpu/build.log)"
        fi
        log "$name: built in $(since "$started"), $(human "$(image_size "$name")")"
        started=$(now)
        rm -f "$CACHE_DIR"/vllm-cpu-*.tar
        buildah push --quiet "$name" "docker-archive:$archive.partial:$name" >/dev/null
        mv "$archive.partial" "$archive"
        # The archive is the cache of record, and the node imports from it: a second 4.9 GB copy in
        # buildah's storage would only take disk (a CI machine ran out of it with both).
        buildah rmi "$name" >/dev/null
        log "$name: archive $(human "$(stat -c %s "$archive")") in $(since "$started") -> $archive"
    fi
    ln -sfn "$archive" "$OUT_DIR/vllm-cpu/image.tar"
    printf '%s\n' "$key" >"$OUT_DIR/vllm-cpu/image.key"
}

cmd_list() {
    local archive found=0
    shopt -s nullglob
    for archive in "$OUT_DIR"/*.tar; do
        found=1
        printf '  %-10s %s\n' "$(human "$(stat -c %s "$archive")")" "$archive"
    done
    ((found)) || log "no archives in $OUT_DIR yet; run hack/images.sh build"
}

main() {
    local started
    started=$(now)
    case ${1:-} in
        base) cmd_base ;;
        build) cmd_build ;;
        vllm) cmd_vllm ;;
        list)
            cmd_list
            return
            ;;
        *)
            sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
    log "${1} done in $(since "$started")"
}

main "$@"
