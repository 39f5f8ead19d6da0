"""The test guard accepts only the cluster `make cluster-up` created."""

from __future__ import annotations

import copy

import pytest

from tests.support.cluster import (
    EXPECTED_CONTEXT,
    ClusterIdentity,
    UnsafeClusterError,
    check_kubeconfig,
    check_live_uid,
    is_loopback_url,
    parse_identity,
)

pytestmark = pytest.mark.unit

IDENTITY = ClusterIdentity(context=EXPECTED_CONTEXT, server="https://127.0.0.1:32867", kube_system_uid="uid-1")

KUBECONFIG = {
    "clusters": [
        {"name": "prod", "cluster": {"server": "https://10.0.0.1:6443"}},
        {"name": "kwok-modelfleet-dev", "cluster": {"server": "https://127.0.0.1:32867"}},
    ],
    "contexts": [
        {"name": "prod", "context": {"cluster": "prod", "user": "admin"}},
        {"name": EXPECTED_CONTEXT, "context": {"cluster": "kwok-modelfleet-dev", "user": "kwok"}},
    ],
    "current-context": "prod",
}


def test_accepts_the_recorded_loopback_context_even_when_another_is_current() -> None:
    assert check_kubeconfig(KUBECONFIG, IDENTITY) == EXPECTED_CONTEXT


def test_refuses_a_context_pointing_elsewhere() -> None:
    moved = copy.deepcopy(KUBECONFIG)
    moved["clusters"][1]["cluster"]["server"] = "https://10.0.0.1:6443"  # type: ignore[index]
    with pytest.raises(UnsafeClusterError, match="not loopback"):
        check_kubeconfig(moved, IDENTITY)


def test_refuses_another_loopback_server_than_recorded() -> None:
    other = ClusterIdentity(EXPECTED_CONTEXT, "https://127.0.0.1:40000", "uid-1")
    with pytest.raises(UnsafeClusterError, match="not at"):
        check_kubeconfig(KUBECONFIG, other)


def test_refuses_a_missing_context_and_a_foreign_recorded_context() -> None:
    with pytest.raises(UnsafeClusterError, match="no context"):
        check_kubeconfig({"contexts": [], "clusters": []}, IDENTITY)
    with pytest.raises(UnsafeClusterError, match="is not"):
        check_kubeconfig(KUBECONFIG, ClusterIdentity("prod", "https://10.0.0.1:6443", "uid"))


def test_refuses_a_cluster_with_another_kube_system_uid() -> None:
    check_live_uid(IDENTITY, "uid-1")
    with pytest.raises(UnsafeClusterError, match="kube-system UID"):
        check_live_uid(IDENTITY, "uid-2")


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("https://127.0.0.1:6443", True),
        ("https://127.8.0.1:6443", True),
        ("https://[::1]:6443", True),
        ("https://localhost:6443", True),
        ("https://10.0.0.1:6443", False),
        ("https://kubernetes.default.svc", False),
        ("not a url", False),
    ],
)
def test_loopback_detection(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


def test_identity_file_parsing() -> None:
    text = f"CLUSTER_NAME=modelfleet-dev\nCONTEXT={EXPECTED_CONTEXT}\nSERVER=https://127.0.0.1:1\nKUBE_SYSTEM_UID=a=b\n"
    assert parse_identity(text) == ClusterIdentity(EXPECTED_CONTEXT, "https://127.0.0.1:1", "a=b")
    with pytest.raises(UnsafeClusterError, match="KUBE_SYSTEM_UID"):
        parse_identity("CONTEXT=x\nSERVER=y\n")
