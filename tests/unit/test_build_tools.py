"""Pure parts of hack/build_tools.py: version mapping, go.mod replacement parsing, CRD selection."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from hack import build_tools

pytestmark = pytest.mark.unit


def test_staging_modules_are_published_as_v0_of_the_same_minor_and_patch() -> None:
    assert build_tools.k8s_staging_version("v1.36.3") == "v0.36.3"
    with pytest.raises(build_tools.ToolError):
        build_tools.k8s_staging_version("1.36")


def test_only_local_path_replacements_are_mapped() -> None:
    go_mod = """module k8s.io/kubernetes

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go v0.0.0 => ./staging/src/k8s.io/client-go
\tgithub.com/foo/bar => github.com/foo/bar v1.2.3
)

replace go.etcd.io/etcd/api/v3 => ../api
replace go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY
"""
    assert build_tools.local_replacements(go_mod) == ["k8s.io/api", "k8s.io/client-go", "go.etcd.io/etcd/api/v3"]


def test_versions_file_has_every_tool_version(tmp_path: Path) -> None:
    versions = build_tools.read_versions()
    catalog = build_tools.tool_catalog(versions)
    kubernetes = {"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy"}
    others = {"etcd", "kwok", "kwokctl", "helm", "helm4", "coredns", "kind", "ollama", "prometheus-operator-crds"}
    real_node = {"registry", "local-path-provisioner", "prometheus", "prometheus-adapter", "kube-router", "traefik"}
    assert set(catalog) == kubernetes | others | real_node
    # hack/node.sh starts both on every `up`: `make tools` (no arguments) must build them.
    assert not real_node & build_tools.OPTIONAL_TOOLS
    registry = catalog["registry"]
    assert isinstance(registry, build_tools.GoTool)
    assert registry.package == "github.com/distribution/distribution/v3/cmd/registry"
    assert registry.sibling_version is None  # no local replacements: plain `go install`
    assert f"-X github.com/distribution/distribution/v3/version.version={versions['DISTRIBUTION_VERSION']}" in (
        registry.ldflags
    )
    assert catalog["local-path-provisioner"].version == versions["LOCAL_PATH_PROVISIONER_VERSION"]
    prometheus = catalog["prometheus"]
    assert isinstance(prometheus, build_tools.GoTool)
    assert "enable_kubernetes_sd" in prometheus.tags  # the reason it is built rather than Debian's
    assert build_tools.prometheus_release("v0.316.0") == "3.16.0"
    adapter = catalog["prometheus-adapter"]
    assert isinstance(adapter, build_tools.GoTool)
    assert (adapter.version, adapter.package) == (
        versions["PROMETHEUS_ADAPTER_VERSION"],
        "sigs.k8s.io/prometheus-adapter/cmd/adapter",
    )
    crds = catalog["prometheus-operator-crds"]
    assert isinstance(crds, build_tools.CrdBundle)
    assert crds.version == versions["PROMETHEUS_OPERATOR_VERSION"]
    # CI needs the CRDs: `make tools` (no arguments) must fetch them.
    assert "prometheus-operator-crds" not in build_tools.OPTIONAL_TOOLS
    assert catalog["kube-apiserver"].sibling_version == build_tools.k8s_staging_version(versions["KUBERNETES_VERSION"])
    assert f"-X k8s.io/component-base/version.gitVersion={versions['KUBERNETES_VERSION']}" in catalog["kubectl"].ldflags

    broken = tmp_path / "versions.env"
    broken.write_text("KWOK_VERSION v0.8.0\n")
    with pytest.raises(build_tools.ToolError, match="malformed"):
        build_tools.read_versions(broken)


def test_amx_scan_finds_tile_instructions_and_ignores_lookalikes() -> None:
    amx = (
        "  401000:\ttileloadd (%rsi,%rdx,1),%tmm0\n  401008:\ttdpbssd %tmm2,%tmm1,%tmm0\n  40100d:\tldtilecfg (%rdi)\n"
    )
    avx = "  401000:\tvpdpbusd %ymm2,%ymm1,%ymm0\n  401006:\tcall 401100 <tileloadd_helper>\n"
    assert build_tools.amx_instruction_count(amx) == 3
    assert build_tools.amx_instruction_count(avx) == 0


SERVICEMONITORS = "monitoring.coreos.com_servicemonitors.yaml"
PROMETHEUSRULES = "monitoring.coreos.com_prometheusrules.yaml"


def test_crd_selection_keeps_group_plural_yaml_files_only_sorted() -> None:
    names = [PROMETHEUSRULES, "kustomization.yaml", "README.md", SERVICEMONITORS, "monitoring.coreos.com_probes.yml"]
    assert build_tools.select_crd_files(names, (SERVICEMONITORS,)) == [
        "monitoring.coreos.com_probes.yml",
        PROMETHEUSRULES,
        SERVICEMONITORS,
    ]


def test_crd_selection_refuses_a_missing_required_file_or_an_empty_directory() -> None:
    with pytest.raises(build_tools.ToolError, match=SERVICEMONITORS):
        build_tools.select_crd_files([PROMETHEUSRULES], (SERVICEMONITORS, PROMETHEUSRULES))
    with pytest.raises(build_tools.ToolError, match="no CRD file"):
        build_tools.select_crd_files(["kustomization.yaml"])


def test_crd_bundle_is_copied_once_then_reused_and_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for the module cache: read-only files, as `go mod download` leaves them.
    module_dir = tmp_path / "module"
    source = module_dir / "example" / "prometheus-operator-crd"
    source.mkdir(parents=True)
    for name in (SERVICEMONITORS, PROMETHEUSRULES, "kustomization.yaml"):
        (source / name).write_text(f"# {name}\n")
        (source / name).chmod(0o444)
    downloads: list[str] = []

    def fake_download(module: str, version: str, workdir: Path) -> dict[str, str]:
        downloads.append(f"{module}@{version}")
        return {"Dir": str(module_dir)}

    monkeypatch.setattr(build_tools, "module_download", fake_download)
    monkeypatch.setattr(build_tools, "CRDS_DIR", tmp_path / "checkout" / ".cache" / "crds")
    monkeypatch.setenv("MODELFLEET_TOOLS_CACHE", str(tmp_path / "tools"))
    bundle = build_tools.CrdBundle(
        name="prometheus-operator-crds",
        module="github.com/prometheus-operator/prometheus-operator",
        version="v0.1.0",
        source_dir="example/prometheus-operator-crd",
        link_name="prometheus-operator",
        required=(SERVICEMONITORS, PROMETHEUSRULES),
    )

    cached = build_tools.ensure(bundle)
    assert cached == tmp_path / "tools" / "prometheus-operator-crds" / "v0.1.0"
    assert sorted(p.name for p in cached.iterdir()) == [PROMETHEUSRULES, SERVICEMONITORS]
    link = tmp_path / "checkout" / ".cache" / "crds" / "prometheus-operator"
    assert link.is_symlink()
    assert link.resolve() == cached.resolve()
    assert build_tools.ensure(bundle) == cached
    assert downloads == ["github.com/prometheus-operator/prometheus-operator@v0.1.0"]

    # An upstream move of the directory is one clear error, not an empty bundle.
    moved = dataclasses.replace(bundle, version="v0.2.0", source_dir="example/crds")
    with pytest.raises(build_tools.ToolError, match="has no directory example/crds"):
        build_tools.ensure(moved)


def test_a_build_is_expected_to_take_this_machines_own_time_else_the_measured_one_scaled_to_its_cores() -> None:
    assert build_tools.expected_seconds("kube-apiserver", {"kube-apiserver": 300.0}, cores=2) == 300.0
    assert build_tools.expected_seconds("kube-apiserver", {}, cores=2) == build_tools.MEASURED_BUILD_SECONDS[
        "kube-apiserver"]  # fmt: skip
    assert build_tools.expected_seconds("kube-apiserver", {}, cores=8) == pytest.approx(
        build_tools.MEASURED_BUILD_SECONDS["kube-apiserver"] / 4)  # fmt: skip
    assert build_tools.expected_seconds("a-new-tool", {}, cores=2) == build_tools.UNMEASURED_BUILD_SECONDS


def test_every_tool_of_the_catalog_has_a_measured_build_time() -> None:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    assert set(catalog) - build_tools.OPTIONAL_TOOLS <= set(build_tools.MEASURED_BUILD_SECONDS)


def test_the_progress_line_says_how_far_each_build_is_and_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    active = {"traefik": (100.0, 531.0), "ollama": (160.0, 398.0)}
    line = build_tools.progress_line(active, 165.0, left=2, left_seconds=798)
    assert line == "  building traefik 1m05s of about 8m51s, ollama 5s of about 6m38s; then 2 more, about 13m18s"
    assert build_tools.progress_line({"ollama": (0.0, 398.0)}, 5.0, 0, 0).endswith("ollama 5s of about 6m38s")
    # This machine's times are kept by the cache, and read back.
    monkeypatch.setenv("MODELFLEET_TOOLS_CACHE", str(tmp_path))
    build_tools.record_duration("traefik", 512.34)
    assert build_tools.recorded_durations() == {"traefik": 512.3}


def test_tools_of_one_module_build_in_one_chain_and_the_longest_chain_goes_first() -> None:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    missing = ["kubectl", "coredns", "kube-apiserver", "kwok", "ollama", "kwokctl", "helm"]
    expected = {"kubectl": 30.0, "coredns": 150.0, "kube-apiserver": 240.0, "kwok": 110.0, "ollama": 300.0,
                "kwokctl": 20.0, "helm": 90.0}  # fmt: skip
    assert build_tools.build_chains(missing, catalog, expected) == [
        ["ollama"],
        ["kubectl", "kube-apiserver"],  # 270 s, in the order asked
        ["coredns"],
        ["kwok", "kwokctl"],
        ["helm"],
    ]


def test_two_chains_build_at_once_and_a_chain_one_tool_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    events: list[str] = []
    lock = threading.Lock()
    both_running = threading.Barrier(2, timeout=10)

    def fake_ensure(tool: build_tools.Tool, board: object = None) -> Path:
        with lock:
            events.append(f"start {tool.name}")
        if tool.name in ("kube-apiserver", "ollama"):
            both_running.wait()  # each waits for the other: only two builds at once get past it
        with lock:
            events.append(f"end {tool.name}")
        return Path("/nonexistent")

    monkeypatch.setattr(build_tools, "ensure", fake_ensure)
    chains = [["kube-apiserver", "kubectl"], ["ollama"]]
    board = build_tools.BuildBoard({}, ["kube-apiserver", "kubectl", "ollama"], jobs=2)
    build_tools.build_all(chains, catalog, board, jobs=2)
    assert events.index("end kube-apiserver") < events.index("start kubectl")
    assert sorted(events) == sorted(f"{what} {name}" for name in ("kube-apiserver", "kubectl", "ollama")
                                    for what in ("start", "end"))  # fmt: skip


def test_after_a_failure_no_new_build_starts_and_the_failure_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    started: list[str] = []

    def fake_ensure(tool: build_tools.Tool, board: object = None) -> Path:
        started.append(tool.name)
        if tool.name == "kube-apiserver":
            raise build_tools.ToolError("failed to build kube-apiserver@v1")
        return Path("/nonexistent")

    monkeypatch.setattr(build_tools, "ensure", fake_ensure)
    board = build_tools.BuildBoard({}, [], jobs=1)
    with pytest.raises(build_tools.ToolError, match="failed to build kube-apiserver"):
        build_tools.build_all([["kube-apiserver", "kubectl"], ["coredns"]], catalog, board, jobs=1)
    assert started == ["kube-apiserver"]


def test_the_number_of_builds_at_once_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_tools.build_jobs() == build_tools.DEFAULT_BUILD_JOBS
    monkeypatch.setenv("MODELFLEET_BUILD_JOBS", "1")
    assert build_tools.build_jobs() == 1
    monkeypatch.setenv("MODELFLEET_BUILD_JOBS", "two")
    with pytest.raises(build_tools.ToolError, match="whole number"):
        build_tools.build_jobs()


def test_the_demo_builds_every_tool_its_cluster_starts_and_leaves_out_only_the_tests_own() -> None:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    demo = set(build_tools.DEMO_TOOLS)
    assert demo <= set(catalog)
    assert set(catalog) - build_tools.OPTIONAL_TOOLS - demo == {"helm4", "kube-router", "traefik"}
    # What `hack/cluster.sh up demo` and `hack/node.sh up --without-network-policies` build must be in the set,
    # or the demo would build it anyway, without the plan's estimate.
    for script in ("cluster.sh", "node.sh"):
        text = (build_tools.REPO_ROOT / "hack" / script).read_text()
        started = text.index("local -a tools=(") + len("local -a tools=(")
        listed = set(text[started : text.index(")", started)].split())
        assert listed, script
        assert listed <= demo, (script, listed - demo)


GGML_CMAKE_EXCERPT = """
    if (GGML_SYSTEM_ARCH STREQUAL "x86")
        set(x 1)
    endif()
if (GGML_CPU_ALL_VARIANTS)
    add_custom_target(ggml-cpu)
    if (GGML_SYSTEM_ARCH STREQUAL "x86")
        ggml_add_cpu_backend_variant(x64)
        ggml_add_cpu_backend_variant(sse42        SSE42)
        ggml_add_cpu_backend_variant(haswell      SSE42 AVX F16C AVX2 BMI2 FMA)
        ggml_add_cpu_backend_variant(icelake      SSE42 AVX F16C AVX2 BMI2 FMA AVX512 AVX512_VBMI AVX512_VNNI)
        ggml_add_cpu_backend_variant(alderlake    SSE42 AVX F16C AVX2 BMI2 FMA AVX_VNNI)
    elseif(GGML_SYSTEM_ARCH STREQUAL "ARM")
            ggml_add_cpu_backend_variant(apple_m1             DOTPROD)
    endif()
endif()
"""
HASWELL_FLAGS = {"sse4_2", "avx", "f16c", "avx2", "bmi2", "fma"}


def test_ggml_variants_are_read_from_the_x86_branch_that_declares_them() -> None:
    variants = build_tools.x86_cpu_variants(GGML_CMAKE_EXCERPT)
    assert list(variants) == ["x64", "sse42", "haswell", "icelake", "alderlake"]
    assert variants["x64"] == ()
    assert variants["alderlake"][-1] == "AVX_VNNI"


@pytest.mark.parametrize(
    ("flags", "chosen"),
    [
        # The baseline, and the variant with the most of this CPU's features: the one ggml loads.
        (HASWELL_FLAGS, ["x64", "haswell"]),
        (HASWELL_FLAGS | {"avx_vnni"}, ["x64", "alderlake"]),
        (HASWELL_FLAGS | {"avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni"}, ["x64", "icelake"]),
        # AVX-512 without VBMI: icelake cannot load, and alderlake needs AVX-VNNI.
        (HASWELL_FLAGS | {"avx512f"}, ["x64", "haswell"]),
        ({"sse4_2"}, ["x64", "sse42"]),
        (set(), ["x64"]),
    ],
)
def test_the_variants_built_are_the_baseline_and_the_best_this_cpu_loads(flags: set[str], chosen: list[str]) -> None:
    assert build_tools.cpu_variants_for(build_tools.x86_cpu_variants(GGML_CMAKE_EXCERPT), flags) == chosen


def test_variants_not_kept_are_commented_out_and_nothing_else_changes() -> None:
    kept = build_tools.keep_cpu_variants(GGML_CMAKE_EXCERPT, {"x64", "icelake"})
    assert list(build_tools.x86_cpu_variants(kept)) == ["x64", "icelake"]
    changed = [line for line in kept.splitlines() if line not in GGML_CMAKE_EXCERPT.splitlines()]
    assert len(changed) == 3
    assert all("# not built for this machine" in line for line in changed)
    assert "ggml_add_cpu_backend_variant(apple_m1             DOTPROD)" in kept


def test_the_variants_to_build_can_be_named_or_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmake = tmp_path / build_tools.GGML_CPU_CMAKE
    cmake.parent.mkdir(parents=True)
    cmake.write_text(GGML_CMAKE_EXCERPT)
    monkeypatch.setenv("MODELFLEET_OLLAMA_CPU_VARIANTS", "all")
    assert build_tools.choose_cpu_variants(tmp_path) is None
    assert cmake.read_text() == GGML_CMAKE_EXCERPT
    monkeypatch.setenv("MODELFLEET_OLLAMA_CPU_VARIANTS", "x64, haswell")
    assert build_tools.choose_cpu_variants(tmp_path) == ["x64", "haswell"]
    assert list(build_tools.x86_cpu_variants(cmake.read_text())) == ["x64", "haswell"]
    cmake.write_text(GGML_CMAKE_EXCERPT)
    monkeypatch.setenv("MODELFLEET_OLLAMA_CPU_VARIANTS", "x64,zen9")
    with pytest.raises(build_tools.ToolError, match="no ggml CPU variant zen9"):
        build_tools.choose_cpu_variants(tmp_path)
