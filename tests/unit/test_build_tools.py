"""Pure parts of hack/build_tools.py: version mapping and go.mod replacement parsing."""

from __future__ import annotations

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
    kubernetes = {"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"}
    assert set(catalog) == kubernetes | {"etcd", "kwok", "kwokctl", "helm", "kind", "ollama"}
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
