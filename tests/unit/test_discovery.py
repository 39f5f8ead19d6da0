"""The mapping from InferenceModels and EndpointSlices to the router's ModelSpecs."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from modelfleet.server.cluster_models import RouterPeers, is_cluster_internal_host, models_from_cluster
from modelfleet.server.model_spec import ModelSpec

pytestmark = pytest.mark.unit

Body = dict[str, Any]


def model(
    name: str,
    spec: Body,
    namespace: str = "ai",
    created: str = "2025-01-01T00:00:00Z",
    generation: int = 1,
    deleting: bool = False,
) -> Body:
    metadata: Body = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{namespace}-{name}",
        "creationTimestamp": created,
        "generation": generation,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-02T00:00:00Z"
    return {"apiVersion": "modelfleet.io/v1alpha1", "kind": "InferenceModel", "metadata": metadata, "spec": spec}


def endpoint_model(name: str, url: str, **endpoint: Any) -> Body:
    return model(name, {"model": "gemma3:270m", "endpoint": {"url": url, **endpoint}})


def managed(name: str, runtime: str = "ollama", namespace: str = "ai") -> Body:
    return model(name, {"runtime": runtime, "model": "phi3:mini"}, namespace=namespace)


def endpoint(*addresses: str, **conditions: bool | None) -> Body:
    item: Body = {"addresses": list(addresses)}
    if conditions:
        item["conditions"] = conditions
    return item


def slice_(
    service: str, endpoints: list[Body], port: int = 11434, namespace: str = "ai", port_name: str = "http"
) -> Body:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-abcde",
            "namespace": namespace,
            "uid": f"slice-{namespace}-{service}-{port}-{len(endpoints)}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def only(specs: list[ModelSpec]) -> ModelSpec:
    assert len(specs) == 1, specs
    return specs[0]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://ollama.ai.svc:11434", "http://ollama.ai.svc:11434"),
        ("http://ollama.ai.svc:11434/", "http://ollama.ai.svc:11434"),
        ("http://vllm.ai.svc.cluster.local:8000/v1", "http://vllm.ai.svc.cluster.local:8000"),
        ("http://vllm.ai.svc.cluster.local:8000/v1/", "http://vllm.ai.svc.cluster.local:8000"),
        ("http://10.1.2.3:8000/prefix/v1", "http://10.1.2.3:8000/prefix"),
        ("http://llm:8080/v10", "http://llm:8080/v10"),
    ],
)
def test_endpoint_url_becomes_the_base_url_without_v1(url: str, expected: str) -> None:
    spec = only(models_from_cluster([endpoint_model("m", url)], []))
    assert spec.endpoints == (expected,)


def test_endpoint_model_with_defaults() -> None:
    spec = only(models_from_cluster([endpoint_model("gemma", "http://127.0.0.1:11434")], []))
    assert spec == ModelSpec(
        name="gemma",
        api="openai",
        upstream_model="gemma3:270m",
        endpoints=("http://127.0.0.1:11434",),
        aliases=(),
        max_in_flight_per_replica=4,
        max_queue=64,
        request_timeout_seconds=300.0,
        remote=False,
        cache_enabled=True,
        cache_ttl_seconds=None,
        requests_per_minute=None,
        tokens_per_minute=None,
        source="cluster",
        namespace="ai",
    )


@pytest.mark.parametrize(("api", "expected"), [(None, "openai"), ("openai", "openai"), ("ollama", "ollama")])
def test_endpoint_api(api: str | None, expected: str) -> None:
    extra = {} if api is None else {"api": api}
    spec = only(models_from_cluster([endpoint_model("m", "http://llm.ai.svc:80", **extra)], []))
    assert spec.api == expected


def test_serving_fields() -> None:
    serving = {
        "aliases": ["small", "fast"],
        "maxInFlightPerReplica": 2,
        "maxQueue": 0,
        "requestTimeoutSeconds": 30,
        "cache": {"enabled": False, "ttlSeconds": 60},
        "rateLimit": {"requestsPerMinute": 100, "tokensPerMinute": 5000},
        "routing": "leastLoaded",
    }
    body = model("m", {"model": "x", "endpoint": {"url": "http://llm.ai.svc"}, "serving": serving})
    spec = only(models_from_cluster([body], []))
    assert (spec.aliases, spec.max_in_flight_per_replica, spec.max_queue, spec.request_timeout_seconds) == (
        ("small", "fast"),
        2,
        0,
        30.0,
    )
    assert (spec.cache_enabled, spec.cache_ttl_seconds) == (False, 60.0)
    assert (spec.requests_per_minute, spec.tokens_per_minute) == (100, 5000)
    assert spec.routing == "leastLoaded"


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        ({"cache": {}}, (True, None, None, None)),
        ({"cache": {"ttlSeconds": 5}}, (True, 5.0, None, None)),
        ({"rateLimit": {"tokensPerMinute": 9}}, (True, None, None, 9)),
        ({"rateLimit": {}}, (True, None, None, None)),
    ],
)
def test_partial_cache_and_rate_limit(serving: Body, expected: tuple[object, ...]) -> None:
    body = model("m", {"model": "x", "endpoint": {"url": "http://llm.ai.svc"}, "serving": serving})
    spec = only(models_from_cluster([body], []))
    assert (spec.cache_enabled, spec.cache_ttl_seconds, spec.requests_per_minute, spec.tokens_per_minute) == expected


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        pytest.param([endpoint("10.0.0.1", ready=True)], ("http://10.0.0.1:11434",), id="ready"),
        pytest.param([endpoint("10.0.0.1")], ("http://10.0.0.1:11434",), id="no-conditions-means-ready"),
        pytest.param([endpoint("10.0.0.1", ready=None)], ("http://10.0.0.1:11434",), id="ready-null-means-ready"),
        pytest.param([endpoint("10.0.0.1", ready=False)], (), id="not-ready"),
        pytest.param([endpoint("10.0.0.1", ready=True, terminating=True)], (), id="terminating-while-still-ready"),
        pytest.param([endpoint("10.0.0.1", serving=True, terminating=True)], (), id="terminating-serving"),
        pytest.param([endpoint("10.0.0.1", ready=True, terminating=False)], ("http://10.0.0.1:11434",), id="alive"),
        pytest.param(
            [endpoint("10.0.0.9", "10.0.0.2"), endpoint("10.0.0.2"), endpoint("10.0.0.5", ready=False)],
            ("http://10.0.0.2:11434", "http://10.0.0.9:11434"),
            id="sorted-and-deduplicated",
        ),
        pytest.param(
            [endpoint("fd00::1"), endpoint("10.0.0.1")],
            ("http://10.0.0.1:11434", "http://[fd00::1]:11434"),
            id="ipv6-in-brackets",
        ),
        pytest.param([], (), id="no-endpoints"),
    ],
)
def test_managed_model_endpoints_from_slices(endpoints: list[Body], expected: tuple[str, ...]) -> None:
    spec = only(models_from_cluster([managed("phi")], [slice_("im-phi", endpoints)]))
    assert spec.endpoints == expected


def test_a_vllm_models_lora_adapters_are_names_of_it() -> None:
    adapters = [{"name": "gemma-pirate", "model": "org/gemma-pirate-lora"}, {"name": "gemma-legal", "model": "/m/x"}]
    body = model("gemma", {"runtime": "vllm", "model": "org/gemma", "adapters": adapters})
    spec = only(models_from_cluster([body], [slice_("im-gemma", [endpoint("10.0.0.1")], port=8000)]))
    assert spec.adapters == ("gemma-pirate", "gemma-legal")
    assert spec.upstream_model == "org/gemma"


@pytest.mark.parametrize(
    ("runtime", "port", "api"),
    [("ollama", 11434, "ollama"), ("vllm", 8000, "openai")],
)
def test_managed_runtime_sets_the_api(runtime: str, port: int, api: str) -> None:
    spec = only(models_from_cluster([managed("m", runtime)], [slice_("im-m", [endpoint("10.0.0.1")], port=port)]))
    assert (spec.api, spec.upstream_model, spec.endpoints, spec.remote) == (
        api,
        "phi3:mini",
        (f"http://10.0.0.1:{port}",),
        False,
    )


def test_slices_of_other_services_namespaces_and_ports_do_not_count() -> None:
    slices = [
        slice_("im-phi", [endpoint("10.0.0.1")]),
        slice_("im-phi", [endpoint("10.0.0.2")], namespace="elsewhere"),  # same Service name, other namespace
        slice_("phi", [endpoint("10.0.0.3")]),  # not the operator's Service
        slice_("im-phi-extra", [endpoint("10.0.0.4")]),
        slice_("im-phi", [endpoint("10.0.0.5")], port_name="metrics"),  # no "http" port
        {**slice_("im-phi", [endpoint("10.0.0.6")]), "ports": None},  # a Service without ports
    ]
    spec = only(models_from_cluster([managed("phi")], slices))
    assert spec.endpoints == ("http://10.0.0.1:11434",)


def test_a_model_spread_over_several_slices_gets_all_ready_addresses() -> None:
    slices = [slice_("im-phi", [endpoint("10.0.0.2")]), slice_("im-phi", [endpoint("10.0.0.1"), endpoint("10.0.0.2")])]
    forward = models_from_cluster([managed("phi")], slices)
    backward = models_from_cluster([managed("phi")], list(reversed(slices)))
    assert only(forward).endpoints == ("http://10.0.0.1:11434", "http://10.0.0.2:11434")
    assert forward == backward  # equal cluster states give equal specs, so the registry sees no change


def test_managed_model_without_slices_has_no_endpoints_yet() -> None:
    spec = only(models_from_cluster([managed("phi")], []))
    assert spec.endpoints == ()
    assert spec.capacity == 0


@pytest.mark.parametrize(
    "host",
    [
        "ollama.ai.svc",
        "ollama.ai.svc.cluster.local",
        "ollama.ai.svc.cluster.local.",
        "node.cluster.local",
        "ollama",
        "localhost",
        "LOCALHOST",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "::1",
        "[::1]",
        "fe80::1",
        "fd00::1",
        "::ffff:10.0.0.1",
    ],
)
def test_cluster_internal_hosts(host: str) -> None:
    assert is_cluster_internal_host(host)


@pytest.mark.parametrize(
    "host",
    ["api.openai.com", "ollama.svc.example.com", "example.com", "8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"],
)
def test_remote_hosts(host: str) -> None:
    assert not is_cluster_internal_host(host)


def test_a_remote_endpoint_is_not_served_without_allow_remote(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="modelfleet.server.cluster_models"):
        specs = models_from_cluster([endpoint_model("gpt", "https://api.openai.com/v1")], [])
    assert specs == []
    assert "ai/gpt is not served" in caplog.text
    assert "allowRemote" in caplog.text


def test_a_remote_endpoint_with_allow_remote_is_marked_remote() -> None:
    spec = only(models_from_cluster([endpoint_model("gpt", "https://api.openai.com/v1", allowRemote=True)], []))
    assert (spec.remote, spec.endpoints) == (True, ("https://api.openai.com",))


def test_allow_remote_does_not_mark_an_internal_endpoint_remote() -> None:
    spec = only(models_from_cluster([endpoint_model("m", "http://llm.ai.svc:80", allowRemote=True)], []))
    assert spec.remote is False


def test_refusal_is_logged_once_per_generation(caplog: pytest.LogCaptureFixture) -> None:
    warned: set[tuple[str, ...]] = set()
    remote = endpoint_model("gpt", "https://api.openai.com")
    with caplog.at_level(logging.WARNING, logger="modelfleet.server.cluster_models"):
        for _ in range(3):
            assert models_from_cluster([remote], [], warned=warned) == []
        assert len(caplog.records) == 1
        remote["metadata"]["generation"] = 2
        models_from_cluster([remote], [], warned=warned)
        assert len(caplog.records) == 2
        # Fixed: nothing to say, and the remembered warnings shrink with it.
        fixed = endpoint_model("gpt", "https://api.openai.com", allowRemote=True)
        assert [s.name for s in models_from_cluster([fixed], [], warned=warned)] == ["gpt"]
        assert warned == set()
        assert len(caplog.records) == 2


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        (("team-b", "2025-01-01T00:00:00Z"), ("team-a", "2025-03-01T00:00:00Z"), "team-b"),  # older wins
        (("team-b", "2025-01-01T00:00:00Z"), ("team-a", "2025-01-01T00:00:00Z"), "team-a"),  # same second: namespace
    ],
)
def test_name_clash_across_namespaces(
    first: tuple[str, str], second: tuple[str, str], winner: str, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [
        model("phi", {"model": "phi3:mini", "endpoint": {"url": f"http://phi.{ns}.svc"}}, namespace=ns, created=ts)
        for ns, ts in (first, second)
    ]
    with caplog.at_level(logging.WARNING, logger="modelfleet.server.cluster_models"):
        for order in (bodies, list(reversed(bodies))):
            spec = only(models_from_cluster(order, []))
            assert spec.endpoints == (f"http://phi.{winner}.svc",)
    loser = "team-a" if winner == "team-b" else "team-b"
    assert f"{loser}/phi is not served: the name is taken by the older {winner}/phi" in caplog.text


def test_managed_model_takes_endpoints_from_its_own_namespace_when_names_clash() -> None:
    bodies = [
        managed("phi", namespace="a"),
        model("phi", {"runtime": "ollama", "model": "x"}, namespace="b", created="2026-01-01T00:00:00Z"),
    ]
    slices = [
        slice_("im-phi", [endpoint("10.0.0.1")], namespace="a"),
        slice_("im-phi", [endpoint("10.0.0.2")], namespace="b"),
    ]
    spec = only(models_from_cluster(bodies, slices))
    assert (spec.upstream_model, spec.endpoints) == ("phi3:mini", ("http://10.0.0.1:11434",))


def test_models_being_deleted_are_not_served_and_do_not_hold_their_name() -> None:
    older_deleting = model(
        "phi",
        {"model": "old", "endpoint": {"url": "http://old.a.svc"}},
        namespace="a",
        created="2024-01-01T00:00:00Z",
        deleting=True,
    )
    newer = model("phi", {"model": "new", "endpoint": {"url": "http://new.b.svc"}}, namespace="b")
    spec = only(models_from_cluster([older_deleting, newer], []))
    assert spec.upstream_model == "new"
    assert models_from_cluster([older_deleting], []) == []


def test_output_is_sorted_by_name() -> None:
    bodies = [endpoint_model(name, "http://llm.ai.svc") for name in ("zeta", "alpha", "mid")]
    assert [spec.name for spec in models_from_cluster(bodies, [])] == ["alpha", "mid", "zeta"]


def test_a_malformed_model_is_skipped_and_the_others_still_served(caplog: pytest.LogCaptureFixture) -> None:
    broken = model("broken", {"endpoint": {"url": "http://llm.ai.svc"}})  # no spec.model
    bad_number = model("bad", {"model": "x", "endpoint": {"url": "http://llm.ai.svc"}, "serving": {"maxQueue": "lots"}})
    neither = model("neither", {"model": "x"})  # no runtime, no endpoint
    with caplog.at_level(logging.WARNING, logger="modelfleet.server.cluster_models"):
        specs = models_from_cluster([broken, bad_number, neither, endpoint_model("fine", "http://llm.ai.svc")], [])
    assert [spec.name for spec in specs] == ["fine"]
    assert "ai/broken is not served" in caplog.text
    assert "ai/bad is not served" in caplog.text
    assert "ai/neither is not served" in caplog.text


# Several router replicas --------------------------------------------------------------------------


def routers_slice(*endpoints: Body) -> Body:
    return slice_("modelfleet-router", list(endpoints), port=8000, namespace="modelfleet")


def caps_of_each_router(addresses: list[str], replicas: int, max_in_flight: int) -> list[int]:
    """The cap each router replica admits for one model with `replicas` ready pods."""
    pods = [f"10.0.1.{i}" for i in range(replicas)]
    body = model("m", {"runtime": "ollama", "model": "m", "serving": {"maxInFlightPerReplica": max_in_flight}})
    caps = []
    for own in addresses:
        peers = RouterPeers(namespace="modelfleet", service="modelfleet-router", address=own)
        spec = only(
            models_from_cluster(
                [body],
                [slice_("im-m", [endpoint(*pods)])] if pods else [],
                peers=peers,
                router_slices=[routers_slice(endpoint(*addresses))],
            )
        )
        caps.append(spec.capacity)
    return caps


@pytest.mark.parametrize(
    ("routers", "replicas", "max_in_flight", "expected"),
    [
        (1, 1, 4, [4]),
        (2, 1, 4, [2, 2]),
        (2, 1, 3, [2, 1]),  # the remainder goes to the first in address order
        (3, 2, 4, [3, 3, 2]),
        (2, 0, 4, [0, 0]),  # no replica: every request waits
        (3, 1, 2, [1, 1, 1]),  # more routers than slots: each keeps one, or some would never serve
    ],
)
def test_routers_divide_each_models_cap_among_themselves(
    routers: int, replicas: int, max_in_flight: int, expected: list[int]
) -> None:
    addresses = [f"10.0.0.{10 - i}" for i in range(routers)]  # listed out of order on purpose
    caps = caps_of_each_router(addresses, replicas, max_in_flight)
    assert sorted(caps, reverse=True) == expected
    if replicas and routers <= replicas * max_in_flight:
        assert sum(caps) == replicas * max_in_flight


def test_a_router_counts_only_ready_peers_and_always_itself() -> None:
    peers = RouterPeers(namespace="modelfleet", service="modelfleet-router", address="10.0.0.9")
    others = routers_slice(
        endpoint("10.0.0.2"),
        endpoint("10.0.0.3", ready=False),
        endpoint("10.0.0.4", ready=True, terminating=True),
    )
    # Not yet ready itself (its own address is not in the slice): it still counts itself.
    assert peers.place([others]) == (2, 1)
    assert peers.place([]) == (1, 0)
    # Another Service's slice in the same namespace says nothing about the routers.
    assert peers.place([slice_("other", [endpoint("10.0.0.1")], namespace="modelfleet")]) == (1, 0)


def test_managed_models_carry_what_load_and_unload_need() -> None:
    body = model("g", {"runtime": "vllm", "model": "org/m", "replicas": 0, "autoscaling": {"enabled": True},
                       "resources": {"gpu": 2, "gpuResource": "amd.com/gpu"}})  # fmt: skip
    body["status"] = {"loadReplicas": 3, "replicas": 1, "phase": "Idle"}
    managed_spec = only(models_from_cluster([body], [])).managed
    assert managed_spec is not None
    assert (managed_spec.replicas, managed_spec.unloaded, managed_spec.autoscaled) == (0, True, True)
    assert (managed_spec.load_replicas, managed_spec.pods, managed_spec.phase) == (3, 1, "Idle")
    assert (managed_spec.gpus_per_replica, managed_spec.gpu_resource) == (2, "amd.com/gpu")
    # The CRD's defaults where the spec and status say nothing.
    defaults = only(models_from_cluster([managed("d")], [])).managed
    assert defaults is not None
    assert (defaults.replicas, defaults.load_replicas, defaults.gpus_per_replica) == (1, 1, 1)
    assert only(models_from_cluster([endpoint_model("e", "http://ollama.ai.svc:11434")], [])).managed is None
