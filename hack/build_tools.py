#!/usr/bin/env python3
"""Build ModelFleet's pinned tools from their Go modules, cached by version.

Every version comes from hack/versions.env.  A binary is built once into
``$MODELFLEET_TOOLS_CACHE/<tool>/<version>/`` (default ``~/.cache/modelfleet/tools``),
which lives outside the work tree so that a fresh clone on the same machine reuses it,
and then linked into ``.cache/bin`` of the checkout.  A rerun only checks files.

Tools: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy
(k8s.io/kubernetes), etcd, kwok, kwokctl, helm, helm4, coredns, registry (distribution),
local-path-provisioner, prometheus, prometheus-adapter, kind (optional) and ollama.
Not every entry is a binary: the Prometheus Operator CRDs (prometheus-operator-crds) are YAML copied out of the pinned
prometheus-operator module into the same cache and linked as ``.cache/crds/prometheus-operator``,
so that tests can install ServiceMonitor and PrometheusRule without a GitHub download.

Some modules (k8s.io/kubernetes, etcd's server) cannot be ``go install``ed: their go.mod
replaces sibling modules with local paths that do not exist in the module zip.  For those
we generate a small wrapper module that requires the tool and replaces each local-path
replacement with the published module of the matching version.

Usage: build_tools.py [TOOL ...]        (default: every tool but the optional ones)
       build_tools.py --for demo        the tools `make demo` needs (DEMO_TOOLS)
       build_tools.py --bin-dir         print the directory of linked binaries
Stdlib only: this runs before any virtualenv exists.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
BIN_DIR = REPO_ROOT / ".cache" / "bin"
CRDS_DIR = REPO_ROOT / ".cache" / "crds"


# Built only on request: kind needs a Docker engine, which these machines do not have.
OPTIONAL_TOOLS = frozenset({"kind"})

# What `make demo` needs, in build order: the control plane, kwok, the real node (without a NetworkPolicy
# enforcer), its registry and volumes, Helm 3, the HPAs' metrics pipeline and Ollama. The rest (Helm 4,
# kube-router, Traefik) only the tests use, and `make test` builds them: about 13 minutes of a first run.
DEMO_TOOLS = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy",
    "kwok", "kwokctl", "coredns", "registry", "local-path-provisioner", "helm", "prometheus",
    "prometheus-adapter", "prometheus-operator-crds", "ollama",
)  # fmt: skip
TOOL_SETS = {"demo": DEMO_TOOLS}

# Seconds each tool took to build from cold Go caches on this workplace's 2-core machines (measured on
# 2026-12-07). They make a first run's estimate; once this machine has built a tool, its own time
# (DURATIONS_FILE in the cache) is used instead. Scaled by the core count: `go build` uses every core.
MEASURED_BUILD_SECONDS = {
    "kube-apiserver": 241, "kube-controller-manager": 100, "kube-scheduler": 8, "kubectl": 34, "kubelet": 34,
    "kube-proxy": 14, "etcd": 30, "kwok": 110, "kwokctl": 17, "helm": 91, "helm4": 144, "coredns": 151,
    "registry": 68, "local-path-provisioner": 54, "prometheus": 111, "prometheus-adapter": 140,
    "kube-router": 127, "traefik": 531, "ollama": 398, "prometheus-operator-crds": 5,
}  # fmt: skip
MEASURED_ON_CORES = 2
UNMEASURED_BUILD_SECONDS = 120
DURATIONS_FILE = "build-seconds.json"


class ToolError(Exception):
    """A failure that is reported as one clear line."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ToolError(f"{path}: malformed line {raw!r}")
        versions[key.strip()] = value.strip()
    return versions


@dataclass(frozen=True)
class GoTool:
    """One binary, built from one package of one Go module."""

    name: str
    module: str
    version: str
    package: str  # full import path of the main package
    ldflags: tuple[str, ...] = ()
    # How a locally replaced sibling module maps to its published version, or None
    # when the module has no local replacements and can be ``go install``ed directly.
    sibling_version: str | None = None
    # Build in a wrapper module even without local replacements: `go install pkg@version` also reads
    # the module's version list (for deprecations), which the module proxy refuses for some modules.
    wrapped: bool = False
    # Build inside a copy of the module itself: its go.mod replaces dependencies with forks (and with
    # directories of its own), which `go install` refuses and a wrapper module would drop.
    in_module: bool = False
    tags: tuple[str, ...] = ()

    @property
    def binary_path(self) -> str:
        return self.name


@dataclass(frozen=True)
class OllamaTool:
    """Ollama: a cgo binary plus ggml CPU backend libraries, built with CMake and Go.

    The layout is fixed by Ollama: the binary finds its backends in ../lib/ollama, after
    resolving symlinks, so the cache keeps bin/ and lib/ side by side.
    """

    version: str
    miniaudio_version: str
    name: str = "ollama"
    module: str = "github.com/ollama/ollama"
    binary_path: str = "bin/ollama"


@dataclass(frozen=True)
class CrdBundle:
    """CustomResourceDefinitions shipped as YAML inside a Go module: copied, not built.

    Only the Go module proxy is reachable, so the CRDs that projects publish as release
    assets come from the module zip instead, at the pinned version.
    """

    name: str
    module: str
    version: str
    source_dir: str  # directory of the CRD files inside the module
    link_name: str  # the cached directory is linked as .cache/crds/<link_name>
    # Files that must be there: a renamed directory upstream would otherwise yield an empty,
    # "successful" bundle and tests failing far from the cause.
    required: tuple[str, ...] = ()


def select_crd_files(names: list[str], required: tuple[str, ...] = ()) -> list[str]:
    """The CRD manifests among a directory's file names, sorted; refuses a bundle missing a required one.

    Generated CRD files are named <group>_<plural>.yaml (monitoring.coreos.com_servicemonitors.yaml);
    anything else there (a kustomization.yaml, a README) is not a CRD.
    """
    selected = sorted(name for name in names if re.fullmatch(r"[a-z0-9.-]+\.[a-z]+_[a-z0-9]+\.ya?ml", name))
    missing = [name for name in required if name not in selected]
    if not selected or missing:
        raise ToolError(f"no CRD file(s) {', '.join(missing) or '<group>_<plural>.yaml'} among {sorted(names)}")
    return selected


def k8s_staging_version(kubernetes_version: str) -> str:
    """k8s.io/kubernetes v1.36.3 publishes its staging modules as v0.36.3."""
    match = re.fullmatch(r"v1\.(\d+)\.(\d+)", kubernetes_version)
    if not match:
        raise ToolError(f"KUBERNETES_VERSION {kubernetes_version!r} is not of the form v1.MINOR.PATCH")
    return f"v0.{match.group(1)}.{match.group(2)}"


def prometheus_release(module_version: str) -> str:
    """Prometheus 3.x publishes its Go module as v0.3MM.P: v0.316.0 is Prometheus 3.16.0."""
    match = re.fullmatch(r"v0\.(\d)(\d\d)\.(\d+)", module_version)
    if not match:
        raise ToolError(f"PROMETHEUS_VERSION {module_version!r} is not of the form v0.3MM.P")
    return f"{match.group(1)}.{int(match.group(2))}.{match.group(3)}"


def kubernetes_ldflags(version: str) -> tuple[str, ...]:
    # kwokctl reads `kube-apiserver --version` to pick flags, so the binaries must know
    # their release; a plain module build would report v0.0.0-master.
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(flags)


Tool = GoTool | OllamaTool | CrdBundle


def tool_catalog(versions: dict[str, str]) -> dict[str, Tool]:
    k8s = versions["KUBERNETES_VERSION"]
    etcd = versions["ETCD_VERSION"]
    kwok = versions["KWOK_VERSION"]
    helm = versions["HELM_VERSION"]
    kind = versions["KIND_VERSION"]
    tools = [
        *(
            GoTool(
                name=name,
                module="k8s.io/kubernetes",
                version=k8s,
                package=f"k8s.io/kubernetes/cmd/{name}",
                ldflags=kubernetes_ldflags(k8s),
                sibling_version=k8s_staging_version(k8s),
            )
            # kubelet and kube-proxy run the local cluster's one real node (hack/node.sh).
            for name in (
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
                "kubelet",
                "kube-proxy",
            )
        ),
        GoTool(
            name="etcd",
            module="go.etcd.io/etcd/server/v3",
            version=etcd,
            package="go.etcd.io/etcd/server/v3",
            sibling_version=etcd,
        ),
        *(
            GoTool(
                name=name,
                module="sigs.k8s.io/kwok",
                version=kwok,
                package=f"sigs.k8s.io/kwok/cmd/{name}",
                ldflags=(
                    f"-X sigs.k8s.io/kwok/pkg/consts.Version={kwok}",
                    f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={k8s}",
                ),
            )
            for name in ("kwok", "kwokctl")
        ),
        GoTool(
            name="helm",
            module="helm.sh/helm/v3",
            version=helm,
            package="helm.sh/helm/v3/cmd/helm",
            ldflags=(f"-X helm.sh/helm/v3/internal/version.version={helm}",),
        ),
        # Helm 4 beside Helm 3: the chart is installed, tested, upgraded and uninstalled with both.
        GoTool(
            name="helm4",
            module="helm.sh/helm/v4",
            version=versions["HELM4_VERSION"],
            package="helm.sh/helm/v4/cmd/helm",
            ldflags=(f"-X helm.sh/helm/v4/internal/version.version={versions['HELM4_VERSION']}",),
        ),
        # Cluster DNS of the real node, so that pods resolve the chart's in-cluster names.
        GoTool(
            name="coredns",
            module="github.com/coredns/coredns",
            version=versions["COREDNS_VERSION"],
            package="github.com/coredns/coredns",
        ),
        # The real node's OCI registry, which holds the Ollama model (hack/registry.sh).
        GoTool(
            name="registry",
            module="github.com/distribution/distribution/v3",
            version=versions["DISTRIBUTION_VERSION"],
            package="github.com/distribution/distribution/v3/cmd/registry",
            ldflags=(f"-X github.com/distribution/distribution/v3/version.version={versions['DISTRIBUTION_VERSION']}",),
        ),
        # Dynamic provisioning of writable volumes on the real node (StorageClass local-path).
        GoTool(
            name="local-path-provisioner",
            module="github.com/rancher/local-path-provisioner",
            version=versions["LOCAL_PATH_PROVISIONER_VERSION"],
            package="github.com/rancher/local-path-provisioner",
            ldflags=(f"-X main.VERSION={versions['LOCAL_PATH_PROVISIONER_VERSION']}",),
        ),
        # Scrapes the routers' pods for the HPAs (hack/monitoring.sh). Built here because Debian's
        # Prometheus has no Kubernetes service discovery. Only that and the file/HTTP discovery are
        # compiled in; the web UI's assets are not (the API is all that is used).
        GoTool(
            name="prometheus",
            module="github.com/prometheus/prometheus",
            version=versions["PROMETHEUS_VERSION"],
            package="github.com/prometheus/prometheus/cmd/prometheus",
            ldflags=(
                f"-X github.com/prometheus/common/version.Version={prometheus_release(versions['PROMETHEUS_VERSION'])}",
            ),
            tags=("remove_all_sd", "enable_kubernetes_sd"),
        ),
        # Serves the router's queue depth to the HPA controller as an External metric (hack/monitoring.sh).
        GoTool(
            name="prometheus-adapter",
            module="sigs.k8s.io/prometheus-adapter",
            version=versions["PROMETHEUS_ADAPTER_VERSION"],
            package="sigs.k8s.io/prometheus-adapter/cmd/adapter",
            # The proxy serves v0.12.0 but refuses the module's version list.
            wrapped=True,
        ),
        # Enforces NetworkPolicies on the real node (firewall-only mode: iptables and ipsets).
        GoTool(
            name="kube-router",
            module="github.com/cloudnativelabs/kube-router/v2",
            version=versions["KUBE_ROUTER_VERSION"],
            package="github.com/cloudnativelabs/kube-router/v2/cmd/kube-router",
            ldflags=(
                "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=" + versions["KUBE_ROUTER_VERSION"],
            ),
        ),
        # The local cluster's ingress controller (hack/ingress.sh): SSE through a real Ingress.
        GoTool(
            name="traefik",
            module="github.com/traefik/traefik/v3",
            version=versions["TRAEFIK_VERSION"],
            package="github.com/traefik/traefik/v3/cmd/traefik",
            ldflags=(f"-X github.com/traefik/traefik/v3/pkg/version.Version={versions['TRAEFIK_VERSION']}",),
            in_module=True,
        ),
        GoTool(name="kind", module="sigs.k8s.io/kind", version=kind, package="sigs.k8s.io/kind"),
    ]
    ollama = OllamaTool(version=versions["OLLAMA_VERSION"], miniaudio_version=versions["MINIAUDIO_PYPI_VERSION"])
    prometheus_operator_crds = CrdBundle(
        name="prometheus-operator-crds",
        module="github.com/prometheus-operator/prometheus-operator",
        version=versions["PROMETHEUS_OPERATOR_VERSION"],
        # Not example/prometheus-operator-crd-full: it adds an AlertmanagerConfig v1beta1 that
        # needs the operator's conversion webhook, which a bare API server does not have.
        source_dir="example/prometheus-operator-crd",
        link_name="prometheus-operator",
        required=("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml"),
    )
    catalog: dict[str, Tool] = {tool.name: tool for tool in tools}
    catalog[ollama.name] = ollama
    catalog[prometheus_operator_crds.name] = prometheus_operator_crds
    return catalog


def cache_root() -> Path:
    configured = os.environ.get("MODELFLEET_TOOLS_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "modelfleet" / "tools"


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Static binaries, no surprise toolchain downloads, and no VCS stamping of a wrapper module.
    env.update({"CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-buildvcs=false"})
    return env


def run_go(args: list[str], cwd: Path, what: str, extra_env: dict[str, str] | None = None) -> None:
    env = go_env() | (extra_env or {})
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        fetch_failure = any(
            marker in proc.stderr
            for marker in (
                "proxy.golang.org",
                "dial tcp",
                "no such host",
                "unknown revision",
                "410 Gone",
                "404 Not Found",
            )
        )
        kind = "cannot fetch" if fetch_failure else "failed to build"
        last = detail[-1] if detail else f"go exited with {proc.returncode}"
        log = Path(tempfile.mkstemp(prefix=f"modelfleet-{what}-", suffix=".log")[1])
        log.write_text(proc.stdout + proc.stderr)
        raise ToolError(f"{kind} {what}: {last} (full log: {log})")


def module_download(module: str, version: str, workdir: Path) -> dict[str, str]:
    """Download a module through the module proxy; return `go mod download -json`'s fields."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir,
        env=go_env(),
        capture_output=True,
        text=True,
    )
    try:
        info: dict[str, str] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Error" in info or "Dir" not in info:
        reason = info.get("Error") or (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ToolError(f"cannot fetch {module}@{version} from the Go module proxy: {reason}")
    return info


def module_go_mod(module: str, version: str, workdir: Path) -> str:
    return Path(module_download(module, version, workdir)["GoMod"]).read_text()


def local_replacements(go_mod_text: str) -> list[str]:
    """Module paths that a go.mod replaces with a local directory (./x or ../x)."""
    modules = []
    for line in go_mod_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("replace "):
            stripped = stripped[len("replace ") :].strip()
        match = re.fullmatch(r"(\S+)(?:\s+\S+)?\s+=>\s+(\.\.?/\S*)", stripped)
        if match and "FORBIDDEN_DEPENDENCY" not in match.group(2):
            modules.append(match.group(1))
    return modules


def build_tool(tool: GoTool, dest: Path) -> None:
    ldflags = " ".join(("-s", "-w", *tool.ldflags))
    tags = [f"-tags={','.join(tool.tags)}"] if tool.tags else []
    with tempfile.TemporaryDirectory(prefix=f"modelfleet-build-{tool.name}-") as tmp:
        work = Path(tmp)
        if tool.in_module:
            source = work / "src"
            shutil.copytree(module_download(tool.module, tool.version, work)["Dir"], source)
            for path in (source, *source.rglob("*")):  # the module cache is read-only
                path.chmod(path.stat().st_mode | 0o200)
            built = work / tool.name
            package = "./" + tool.package.removeprefix(tool.module).lstrip("/")
            run_go(
                ["build", "-trimpath", f"-ldflags={ldflags}", *tags, "-o", str(built), package],
                source,
                f"{tool.name}@{tool.version}",
            )
        elif tool.sibling_version is None and not tool.wrapped:
            gobin = work / "bin"
            run_go(
                ["install", "-trimpath", f"-ldflags={ldflags}", *tags, f"{tool.package}@{tool.version}"],
                work,
                f"{tool.name}@{tool.version}",
                {"GOBIN": str(gobin)},
            )
            built = gobin / tool.package.rsplit("/", 1)[-1]
        else:
            run_go(["mod", "init", f"modelfleet.local/tools/{tool.name}"], work, f"{tool.name} wrapper module")
            upstream = module_go_mod(tool.module, tool.version, work)
            edits = [f"-require={tool.module}@{tool.version}"]
            for sibling in local_replacements(upstream):
                if tool.sibling_version is None:
                    raise ToolError(f"{tool.module} replaces {sibling} with a local path; set sibling_version")
                edits.append(f"-replace={sibling}={sibling}@{tool.sibling_version}")
            run_go(["mod", "edit", *edits], work, f"{tool.name} wrapper module")
            built = work / tool.name
            run_go(
                ["build", "-mod=mod", "-trimpath", f"-ldflags={ldflags}", *tags, "-o", str(built), tool.package],
                work,
                f"{tool.name}@{tool.version}",
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.chmod(0o755)
        partial.replace(dest)


# Instructions that only AMX kernels use; ggml's AMX path crashed on machines like ours.
AMX_MNEMONICS = re.compile(
    r"\b(tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|ldtilecfg|sttilecfg"
    r"|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|tdpfp16ps)\b"
)
# Debian headers that replace llama.cpp's vendor/ tree, which Go module zips leave out.
OLLAMA_SYSTEM_HEADERS = {
    "nlohmann": Path("/usr/include/nlohmann"),
    "stb/stb_image.h": Path("/usr/include/stb/stb_image.h"),
}


def amx_instruction_count(disassembly: str) -> int:
    return len(AMX_MNEMONICS.findall(disassembly))


def say(line: str) -> None:
    """A whole line; on a terminal it first clears the live line of the builds (BuildBoard redraws it)."""
    print(f"\r\033[K{line}" if sys.stdout.isatty() else line, flush=True)


def run_step(label: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log = Path(tempfile.mkstemp(prefix=f"modelfleet-ollama-{label.replace(' ', '-')}-", suffix=".log")[1])
        log.write_text(proc.stdout + proc.stderr)
        last = ([line for line in proc.stderr.splitlines() if line.strip()] or [f"exit {proc.returncode}"])[-1]
        raise ToolError(f"ollama: {label} failed: {last} (full log: {log})")
    say(f"    ollama: {label:<28} {time.monotonic() - started:6.1f}s")


def fetch_miniaudio_header(version: str, work: Path) -> Path:
    """miniaudio.h from the PyPI source distribution of pyminiaudio (the registry we can reach)."""
    download_dir = work / "miniaudio"
    run_step(
        "pip download miniaudio",
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"miniaudio=={version}", "-d", str(download_dir)],
        work,
        dict(os.environ),
    )  # fmt: skip
    archives = list(download_dir.glob("miniaudio-*.tar.gz"))
    if not archives:
        raise ToolError(f"ollama: the miniaudio=={version} source distribution has no .tar.gz")
    with tarfile.open(archives[0]) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith("/miniaudio/miniaudio.h")), None)
        if member is None:
            raise ToolError(f"ollama: miniaudio=={version} does not contain miniaudio/miniaudio.h")
        archive.extract(member, download_dir, filter="data")
    return download_dir / member.name


# ggml names each x86 feature as its CMake options do; /proc/cpuinfo names them so.
GGML_FEATURE_FLAGS = {
    "SSE42": "sse4_2", "AVX": "avx", "F16C": "f16c", "AVX2": "avx2", "BMI2": "bmi2", "FMA": "fma",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
    "AVX_VNNI": "avx_vnni",
}  # fmt: skip
GGML_CPU_CMAKE = Path("ml/backend/ggml/ggml/src/CMakeLists.txt")
GGML_X86_VARIANT = re.compile(r"^(\s*)ggml_add_cpu_backend_variant\((\w+)((?:\s+\w+)*)\)\s*$")


def x86_cpu_variants(cmake_text: str) -> dict[str, tuple[str, ...]]:
    """ggml's x86 CPU backend variants, each with the features it is compiled for, as its CMake declares them."""
    # The last x86 branch of the file is the one that declares the variants (ggml_add_cpu_backend_variant).
    block = cmake_text.rsplit('GGML_SYSTEM_ARCH STREQUAL "x86"', 1)[-1].split("elseif", 1)[0]
    variants = {}
    for line in block.splitlines():
        if match := GGML_X86_VARIANT.match(line):
            variants[match.group(2)] = tuple(match.group(3).split())
    return variants


def cpu_variants_for(variants: dict[str, tuple[str, ...]], cpu_flags: set[str]) -> list[str]:
    """The variants worth building for a machine: the baseline, which runs on any x86-64, and the one ggml
    would load here (it scores every library it can load and takes the highest, which is the one compiled
    for the most of this CPU's features). The other five are for other CPUs, and cost minutes of C++."""
    usable = [
        name for name, features in variants.items()
        if all(GGML_FEATURE_FLAGS.get(feature, feature.lower()) in cpu_flags for feature in features)
    ]  # fmt: skip
    if not usable:
        return []
    best = max(usable, key=lambda name: len(variants[name]))
    baseline = min(variants, key=lambda name: len(variants[name]))
    return sorted({baseline, best}, key=list(variants).index)


def keep_cpu_variants(cmake_text: str, keep: set[str]) -> str:
    """ggml's CMake with the x86 variants outside `keep` commented out."""
    x86 = x86_cpu_variants(cmake_text)
    lines = []
    for line in cmake_text.splitlines(keepends=True):
        match = GGML_X86_VARIANT.match(line.rstrip("\n"))
        if match and match.group(2) in x86 and match.group(2) not in keep:
            line = f"{match.group(1)}# not built for this machine (hack/build_tools.py): {line.lstrip()}"
        lines.append(line)
    return "".join(lines)


def machine_cpu_flags() -> set[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def choose_cpu_variants(src: Path) -> list[str] | None:
    """The ggml CPU variants to build, or None for all of them (MODELFLEET_OLLAMA_CPU_VARIANTS=all, for a
    binary that runs well on other CPUs too, or a machine whose features cannot be read)."""
    cmake_file = src / GGML_CPU_CMAKE
    variants = x86_cpu_variants(cmake_file.read_text())
    requested = os.environ.get("MODELFLEET_OLLAMA_CPU_VARIANTS", "").strip()
    if requested == "all" or not variants:
        return None
    chosen = [name.strip() for name in requested.split(",") if name.strip()] or cpu_variants_for(
        variants, machine_cpu_flags()
    )
    if not chosen:
        return None
    unknown = [name for name in chosen if name not in variants]
    if unknown:
        raise ToolError(f"ollama: no ggml CPU variant {', '.join(unknown)}; known: {', '.join(variants)}")
    cmake_file.write_text(keep_cpu_variants(cmake_file.read_text(), set(chosen)))
    return chosen


def build_ollama(tool: OllamaTool, dest_dir: Path) -> None:
    """CMake builds ggml's CPU variants as loadable libraries, then cgo builds the binary.

    Variants: of ggml's x64, sse42, sandybridge, haswell, skylakex, icelake and alderlake libraries, only
    the baseline and the one this machine loads are built (choose_cpu_variants), unless
    MODELFLEET_OLLAMA_CPU_VARIANTS says otherwise ("all", or names separated by commas).

    AMX: Ollama's CMake builds its variants with GGML_NATIVE off (it patches out the AMX "sapphirerapids" one);
    we also pass GGML_AMX_*=OFF and never set -march=native in CGO_CFLAGS, because the
    binary compiles a fallback CPU backend with the cgo flags.  A disassembly scan then
    refuses any AMX instruction in the result.
    """
    for tool_name in ("cmake", "gcc", "g++", "objdump"):
        if shutil.which(tool_name) is None:
            raise ToolError(f"ollama: {tool_name} is not installed; run `make install-system`")
    for header in OLLAMA_SYSTEM_HEADERS.values():
        if not header.exists():
            raise ToolError(f"ollama: {header} is missing; run `make install-system` (nlohmann-json3-dev, libstb-dev)")
    with tempfile.TemporaryDirectory(prefix="modelfleet-build-ollama-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in go_env().items() if k not in ("CGO_CFLAGS", "CGO_CXXFLAGS", "CFLAGS", "CXXFLAGS")}
        env["CGO_ENABLED"] = "1"
        module_dir = Path(module_download(tool.module, tool.version, work)["Dir"])
        src = work / "src"
        shutil.copytree(module_dir, src)
        for path in [src, *src.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        vendor = src / "llama" / "llama.cpp" / "vendor"
        (vendor / "stb").mkdir(parents=True, exist_ok=True)
        (vendor / "miniaudio").mkdir(parents=True, exist_ok=True)
        shutil.copytree(OLLAMA_SYSTEM_HEADERS["nlohmann"], vendor / "nlohmann", dirs_exist_ok=True)
        shutil.copy2(OLLAMA_SYSTEM_HEADERS["stb/stb_image.h"], vendor / "stb" / "stb_image.h")
        shutil.copy2(fetch_miniaudio_header(tool.miniaudio_version, work), vendor / "miniaudio" / "miniaudio.h")

        chosen = choose_cpu_variants(src)
        say(f"    ollama: ggml CPU variants: {', '.join(chosen) if chosen else 'all'}")
        amx_off = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        run_step("cmake configure", ["cmake", "--preset", "CPU", "-DGGML_CCACHE=OFF", *amx_off], src, env)
        jobs = str(os.cpu_count() or 2)
        run_step("cmake build (ggml CPU)", ["cmake", "--build", "--preset", "CPU", "--parallel", jobs], src, env)
        # The preset fixes the install prefix at configure time: files land in src/dist/.
        run_step("cmake install", ["cmake", "--install", "build", "--component", "CPU", "--strip"], src, env)

        staged = work / "staged"
        (staged / "bin").mkdir(parents=True)
        shutil.copytree(src / "dist" / "lib" / "ollama", staged / "lib" / "ollama", symlinks=True)
        ldflags = f"-s -w -X github.com/ollama/ollama/version.Version={tool.version.lstrip('v')}"
        binary = staged / tool.binary_path
        run_step(
            "go build (cgo)", ["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(binary), "."], src, env
        )

        for artefact in [binary, *(staged / "lib" / "ollama").glob("*.so*")]:
            if artefact.is_symlink():
                continue
            disassembly = subprocess.run(
                ["objdump", "-d", "--no-show-raw-insn", str(artefact)], capture_output=True, text=True, check=True
            ).stdout
            if (count := amx_instruction_count(disassembly)) > 0:
                raise ToolError(f"ollama: {artefact.name} contains {count} AMX instructions; refusing this build")
        say("    ollama: AMX scan: no AMX instructions in the binary or its ggml libraries")

        partial = dest_dir.with_name(dest_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(dest_dir, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, partial, symlinks=True)
        partial.replace(dest_dir)


def copy_crds(bundle: CrdBundle, dest_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"modelfleet-fetch-{bundle.name}-") as tmp:
        module_dir = Path(module_download(bundle.module, bundle.version, Path(tmp))["Dir"])
        source = module_dir / bundle.source_dir
        if not source.is_dir():
            raise ToolError(f"{bundle.module}@{bundle.version} has no directory {bundle.source_dir}")
        try:
            names = select_crd_files([p.name for p in source.iterdir() if p.is_file()], bundle.required)
        except ToolError as exc:
            raise ToolError(f"{bundle.module}@{bundle.version}/{bundle.source_dir}: {exc}") from None
        # Staged then renamed, as for Ollama: an interrupted copy never looks like a cached bundle.
        partial = dest_dir.with_name(dest_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in names:
            # copyfile, not copy2: the module cache's files are read-only, the cache's need not be.
            shutil.copyfile(source / name, partial / name)
        shutil.rmtree(dest_dir, ignore_errors=True)
        partial.replace(dest_dir)


def ensure_crds(bundle: CrdBundle) -> Path:
    bundle_dir = cache_root() / bundle.name / bundle.version
    if bundle_dir.is_dir() and all((bundle_dir / name).is_file() for name in bundle.required):
        say(f"  {bundle.name:<24} {bundle.version:<9} cached   {bundle_dir}")
    else:
        say(f"  {bundle.name:<24} {bundle.version:<9} fetching from {bundle.module} ...")
        started = time.monotonic()
        copy_crds(bundle, bundle_dir)
        say(f"  {bundle.name:<24} {bundle.version:<9} fetched in {time.monotonic() - started:.1f}s")
    CRDS_DIR.mkdir(parents=True, exist_ok=True)
    link = CRDS_DIR / bundle.link_name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(bundle_dir, target_is_directory=True)
    return bundle_dir


def is_cached(tool: Tool) -> bool:
    if isinstance(tool, CrdBundle):
        bundle_dir = cache_root() / tool.name / tool.version
        return bundle_dir.is_dir() and all((bundle_dir / name).is_file() for name in tool.required)
    dest = cache_root() / tool.name / tool.version / tool.binary_path
    return dest.is_file() and os.access(dest, os.X_OK)


def recorded_durations() -> dict[str, float]:
    try:
        recorded = json.loads((cache_root() / DURATIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): float(seconds) for name, seconds in recorded.items()} if isinstance(recorded, dict) else {}


def record_duration(name: str, seconds: float) -> None:
    recorded = recorded_durations()
    recorded[name] = round(seconds, 1)
    cache_root().mkdir(parents=True, exist_ok=True)
    (cache_root() / DURATIONS_FILE).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def expected_seconds(name: str, recorded: dict[str, float], cores: int) -> float:
    """This machine's own time for the tool if it has one, else the measured table's scaled to `cores`."""
    if name in recorded:
        return recorded[name]
    return MEASURED_BUILD_SECONDS.get(name, UNMEASURED_BUILD_SECONDS) * MEASURED_ON_CORES / max(1, cores)


def children_cpu_seconds() -> float:
    """User and system time of every finished child process so far (go, cmake and the compilers they ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# Tools built at once. A cold `go build` keeps about 1.2 of 2 cores busy (module downloads, the
# packages on the dependency graph's critical path, the single-threaded linker), so a second build
# fills the idle time; more would only queue on the cores. MODELFLEET_BUILD_JOBS overrides it.
DEFAULT_BUILD_JOBS = 2
# How much sooner two builds at once finish than the sum of the tools' times above: a first run of the
# demo's 17 tools here built in 962 s what the table sums to 1,606 s (2.0 cores busy throughout). The
# plan's estimate of the wall time divides that sum by it.
PARALLEL_SPEEDUP = 1.6


def build_jobs() -> int:
    try:
        return max(1, int(os.environ.get("MODELFLEET_BUILD_JOBS", DEFAULT_BUILD_JOBS)))
    except ValueError:
        raise ToolError("MODELFLEET_BUILD_JOBS must be a whole number") from None


def build_chains(missing: list[str], catalog: dict[str, Tool], expected: dict[str, float]) -> list[list[str]]:
    """The missing tools grouped into chains that build one after another, longest chain first.

    Tools of one module share a chain (the six Kubernetes binaries, kwok and kwokctl): the later ones
    reuse the packages the first compiled, and built at once they would compile them twice. Chains
    have nothing in common, so two can build at once; the longest first keeps the last one short."""
    chains: dict[str, list[str]] = {}
    for name in missing:
        chains.setdefault(catalog[name].module, []).append(name)
    return sorted(chains.values(), key=lambda chain: -sum(expected[name] for name in chain))


def wall_seconds(chains: list[list[str]], expected: dict[str, float], jobs: int) -> float:
    """About how long building the chains takes: the tools' times, shortened when two build at once."""
    total = sum(expected[name] for chain in chains for name in chain)
    return total / PARALLEL_SPEEDUP if jobs > 1 and len(chains) > 1 else total


def progress_line(active: dict[str, tuple[float, float]], now: float, left: int, left_seconds: float) -> str:
    """One look at the builds running (name: started, expected seconds) and at what is left after them."""
    running = ", ".join(
        f"{name} {minutes(now - started)} of about {minutes(expected)}" for name, (started, expected) in active.items()
    )
    line = f"  building {running}"
    if left:
        line += f"; then {left} more, about {minutes(left_seconds)}"
    return line


class BuildBoard:
    """What builds now, shown as one live line: rewritten every second on a terminal, a plain line a
    minute otherwise (a log or CI keeps whole lines). Workers print whole lines through it."""

    def __init__(self, expected: dict[str, float], queued: list[str], jobs: int) -> None:
        self.expected, self.queued, self.jobs = expected, list(queued), jobs
        self.active: dict[str, tuple[float, float]] = {}
        self.tty = sys.stdout.isatty()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BuildBoard:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            print("\r\033[K", end="", flush=True)

    def say(self, line: str) -> None:
        with self._lock:
            say(line)

    def started(self, name: str) -> None:
        with self._lock:
            if name in self.queued:
                self.queued.remove(name)
            self.active[name] = (time.monotonic(), self.expected.get(name, UNMEASURED_BUILD_SECONDS))

    def finished(self, name: str) -> None:
        with self._lock:
            self.active.pop(name, None)

    def line(self) -> str:
        with self._lock:
            left_seconds = sum(self.expected.get(name, UNMEASURED_BUILD_SECONDS) for name in self.queued)
            speedup = PARALLEL_SPEEDUP if self.jobs > 1 else 1.0
            return progress_line(dict(self.active), time.monotonic(), len(self.queued), left_seconds / speedup)

    def _run(self) -> None:
        interval = 1.0 if self.tty else 60.0
        while not self._stop.wait(interval):
            if self.active:
                line = self.line()
                if self.tty:  # a line wider than the terminal wraps, and \r would rewrite only its last part
                    line = line[: shutil.get_terminal_size().columns - 1]
                with self._lock:
                    print(f"\r\033[K{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)


def ensure(tool: Tool, board: BuildBoard | None = None) -> Path:
    if isinstance(tool, CrdBundle):
        return ensure_crds(tool)
    tell = board.say if board else say
    tool_dir = cache_root() / tool.name / tool.version
    dest = tool_dir / tool.binary_path
    if is_cached(tool):
        tell(f"  {tool.name:<24} {tool.version:<9} cached   {dest}")
    else:
        tell(f"  {tool.name:<24} {tool.version:<9} building from {tool.module} ...")
        started = time.monotonic()
        if board:
            board.started(tool.name)
        try:
            if isinstance(tool, OllamaTool):
                build_ollama(tool, tool_dir)
            else:
                build_tool(tool, dest)
        finally:
            if board:
                board.finished(tool.name)
        took = time.monotonic() - started
        record_duration(tool.name, took)
        tell(f"  {tool.name:<24} {tool.version:<9} built in {took:.1f}s")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    link = BIN_DIR / tool.name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(dest)
    return dest


def build_all(chains: list[list[str]], catalog: dict[str, Tool], board: BuildBoard, jobs: int) -> None:
    """Build the chains on `jobs` workers, each taking the next chain when it is free. After a failure
    no new build starts; the running ones finish, and the first failure is raised."""
    pending = list(chains)
    failures: list[ToolError] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if failures or not pending:
                    return
                chain = pending.pop(0)
            for name in chain:
                try:
                    ensure(catalog[name], board)
                except ToolError as exc:
                    with lock:
                        failures.append(exc)
                    return
                if failures:
                    return

    workers = [threading.Thread(target=worker) for _ in range(min(jobs, len(chains)))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if failures:
        raise failures[0]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--bin-dir"]:
        print(BIN_DIR)
        return 0
    try:
        if shutil.which("go") is None:
            raise ToolError("Go is not installed or not on PATH; install Go 1.26+ (https://go.dev/doc/install)")
        catalog = tool_catalog(read_versions())
        if argv[:1] == ["--for"]:
            if len(argv) != 2 or argv[1] not in TOOL_SETS:
                raise ToolError(f"--for takes one of {', '.join(TOOL_SETS)}")
            argv = list(TOOL_SETS[argv[1]])
        wanted = argv or [name for name in catalog if name not in OPTIONAL_TOOLS]
        unknown = [name for name in wanted if name not in catalog]
        if unknown:
            raise ToolError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(catalog)}")
        print(f"tools: cache {cache_root()}, links in {BIN_DIR} and {CRDS_DIR}", flush=True)
        cores, jobs = os.cpu_count() or 1, build_jobs()
        recorded = recorded_durations()
        missing = [name for name in wanted if not is_cached(catalog[name])]
        expected = {name: expected_seconds(name, recorded, cores) for name in missing}
        chains = build_chains(missing, catalog, expected)
        if missing:
            total = minutes(wall_seconds(chains, expected, jobs))
            print(f"tools: {len(missing)} to build from source ({', '.join(missing)}): about {total} on {cores} "
                  f"cores, {jobs} at a time, once; later runs reuse them", flush=True)  # fmt: skip
        started, cpu_started = time.monotonic(), children_cpu_seconds()
        for name in wanted:
            if name not in missing:
                ensure(catalog[name])
        if missing:
            with BuildBoard(expected, [name for chain in chains for name in chain], jobs) as board:
                build_all(chains, catalog, board, jobs)
        took, cpu = time.monotonic() - started, children_cpu_seconds() - cpu_started
        # How busy the cores were says whether building more at once would pay.
        busy = f" ({cpu:.0f} CPU-seconds, {cpu / took:.1f} cores busy)" if missing and took > 0 else ""
        print(f"tools: ready in {took:.1f}s{busy}", flush=True)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
