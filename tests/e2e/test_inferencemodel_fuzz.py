"""Hostile input, through the real API server.

1. Invalid InferenceModels are refused (422 Invalid, or 400 for unknown fields) with a message that
   names the field and says what it needs.  The mutations are derived from the CRD that is installed:
   every field gets a wrong type, every bound its neighbour outside, every enum a stranger, every
   length limit one more, every required field its absence, every object an unknown field, and every
   CEL rule values that break it.  Server-side dry run, so nothing is stored.
2. Odd but valid InferenceModels (boundary numbers, 60-character names, unicode model names, every
   runtime and endpoint API, empty lists and maps) are accepted, and so is every child the builders
   make of them (server-side dry run as well).
3. A sample of them is created for real while the operator runs as its own ServiceAccount: each one
   reaches a status for its current generation, specs the API server's pod validation refuses get a
   failed condition that says why, the operator stays alive and logs no traceback, and a plain model
   created afterwards is still reconciled, so the queue is not wedged.

Hypothesis runs derandomized, without an example database, with bounded example counts.
"""

from __future__ import annotations

import copy
import json
import re
import string
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.rest import ApiException

from modelfleet.api import v1alpha1
from modelfleet.operator.builders.common import ModelContext, child_name
from modelfleet.operator.kube import Kube
from tests.e2e.conftest import CRD_PATH, Cluster, OperatorProcess, wait_for
from tests.support.models import all_children
from tests.support.procs import free_port

pytestmark = pytest.mark.e2e

Json = Any


class MapKey(str):
    """A key of a map in a path (printed as [key], as the API server does)."""


Path = tuple[str | int, ...]


def fuzz_settings(max_examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )


# The API ------------------------------------------------------------------------------------------


def manifest(name: str, spec: Json) -> dict[str, Any]:
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


def create_model(
    cluster: Cluster, namespace: str, name: str, spec: Json, dry_run: bool = True, strict: bool = True
) -> dict[str, Any]:
    """Create (by default only as a server-side dry run); strict refuses unknown fields instead of dropping them."""
    body: dict[str, Any] = client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        v1alpha1.GROUP,
        v1alpha1.VERSION,
        namespace,
        v1alpha1.PLURAL,
        manifest(name, spec),
        dry_run="All" if dry_run else None,
        field_validation="Strict" if strict else None,
    )
    return body


def get_model(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name
    )
    return body


def dry_run_apply(cluster: Cluster, child: dict[str, Any]) -> None:
    """Server-side apply of one child exactly as the operator sends it, without storing it."""
    Kube(cluster.api).apply(child, dry_run=True)


def refusal(exc: ApiException) -> tuple[str, list[str]]:
    body = json.loads(exc.body)
    causes = [str(cause.get("field", "")) for cause in (body.get("details") or {}).get("causes") or []]
    return str(body.get("message", "")), causes


@pytest.fixture(scope="module")
def fuzz_namespace(cluster: Cluster, inferencemodel_crd: str) -> Iterator[str]:
    """One namespace for the whole module (the fuzz cases are many; a namespace each would be slow)."""
    core = client.CoreV1Api(cluster.api)
    name = f"t-im-fuzz-{uuid.uuid4().hex[:6]}"
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"modelfleet.io/test": "e2e"}))
    )
    wait_for(lambda: core.read_namespaced_service_account("default", name) is not None, "default ServiceAccount")
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


# Valid bases: together they hold every field of the spec ------------------------------------------

MANAGED_BASE: Json = {
    "runtime": "vllm",
    "model": "Qwen/Qwen2.5-0.5B-Instruct",
    "image": "docker.io/vllm/vllm-openai:v0.32.0",
    "source": {
        "huggingFaceEndpoint": "https://hf-mirror.models.svc:8090",
        "caConfigMapRef": {"name": "hub-ca", "key": "ca.crt"},
    },
    "adapters": [{"name": "qwen-support", "model": "org/qwen-support-lora"}],
    "replicas": 1,
    "resources": {"gpu": 1, "gpuResource": "nvidia.com/gpu", "cpu": "4", "memory": "24Gi"},
    "scheduling": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [
            {"key": "example.com/t", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30}
        ],
        "affinity": {},
        "priorityClassName": "high",
        "runtimeClassName": "nvidia",
    },
    "cache": {
        "size": "20Gi",
        "storageClassName": "fast",
        "accessMode": "ReadWriteMany",
        "existingClaim": "weights",
        "hfTokenSecretRef": {"name": "hf", "key": "token"},
    },
    "engine": {"args": ["--max-model-len", "8192"], "env": [{"name": "A", "value": "1"}]},
    "autoscaling": {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetQueueDepthPerReplica": 4,
        "metric": "engine",
        "scaleDownStabilizationSeconds": 300,
    },
    "serving": {
        "aliases": ["qwen"],
        "maxInFlightPerReplica": 4,
        "maxQueue": 64,
        "requestTimeoutSeconds": 300,
        "cache": {"enabled": True, "ttlSeconds": 60},
        "rateLimit": {"requestsPerMinute": 60, "tokensPerMinute": 1000},
    },
}
# The registry source is for Ollama only, and its insecure and caConfigMapRef exclude each other.
OLLAMA_BASE: Json = {
    "runtime": "ollama",
    "model": "gemma3:270m",
    "source": {"registry": "registry.models.svc:5000", "caConfigMapRef": {"name": "registry-ca", "key": "ca.crt"}},
}
ENDPOINT_BASE: Json = {
    "model": "gemma3:270m",
    "endpoint": {
        "url": "http://ollama.models.svc:11434",
        "api": "ollama",
        "apiKeySecretRef": {"name": "backend", "key": "api-key"},
        "allowRemote": False,
    },
}


def crd_spec_schema() -> dict[str, Any]:
    document = yaml.safe_load(CRD_PATH.read_text())
    schema: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


# Invalid specs ------------------------------------------------------------------------------------


@dataclass
class Mutation:
    """One way to break one field: a strategy of replacement values (DELETE removes the field)."""

    label: str
    base: Json
    path: Path
    values: st.SearchStrategy[Any]
    expect: str  # text the API server's message must contain: what the field needs ("|" between alternatives)
    status: int = 422
    expect_path: str = ""  # defaults to the field's own path

    @property
    def field_paths(self) -> set[str]:
        """The field's path as the API server may print it (a map key as [key] or as .key)."""
        if self.expect_path:
            return {self.expect_path}
        path = ("spec", *self.path)
        return {path_text(path), path_text(tuple(str(p) if isinstance(p, MapKey) else p for p in path))}


DELETE = object()


def path_text(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, (int, MapKey)):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def mutated(base: Json, path: Path, value: Any) -> Json:
    if not path:
        return value
    spec = copy.deepcopy(base)
    node = spec
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return spec


def wrong_types(kind: str) -> st.SearchStrategy[Any]:
    """JSON values of any type but `kind`."""
    fractional = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9).filter(
        lambda f: not f.is_integer()
    )
    strategies = {
        "string": st.text(max_size=8),
        "integer": st.integers(-(2**31), 2**31),
        "number": fractional,
        "boolean": st.booleans(),
        "array": st.lists(st.integers(), max_size=2),
        "object": st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
    }
    excluded = {"int-or-string": {"string", "integer"}, "integer": {"integer"}}.get(kind, {kind})
    return st.one_of([strategy for name, strategy in strategies.items() if name not in excluded])


# Values that break each CEL rule of a single field, keyed by the rule's message in the CRD.  Every
# message in the CRD must appear here (see test_every_field_rule_has_breaking_values).
BREAKING: dict[str, st.SearchStrategy[Any]] = {
    "must be a non-negative Kubernetes quantity such as 20Gi, 512Mi, 500m or 4": st.one_of(
        st.sampled_from(["12Gx", "20 gigs", "-1", "-500m", "1.2.3", "Gi", "", "0x10", "1e", "--1"]),
        st.integers(max_value=-1, min_value=-(2**62)),
        st.from_regex(r"\A-[1-9][0-9]{0,5}(m|Ki|Mi|Gi)?\Z"),
    ),
    "must be a Kubernetes quantity greater than zero, such as 20Gi": st.one_of(
        st.sampled_from(["0", "0Gi", "-1Gi", "12Gx", "", "0.0"]), st.integers(max_value=0, min_value=-(2**62))
    ),
    "must be an extended resource name with a domain, such as nvidia.com/gpu or amd.com/gpu": st.sampled_from(
        [
            "gpu",
            "nvidia.com/",
            "/gpu",
            "Nvidia.COM/gpu",
            "nvidia.com/gpu!",
            "kubernetes.io/gpu",
            "node.kubernetes.io/gpu",
            "requests.nvidia.com/gpu",
            "a b/c",
            "example.com/-gpu",
        ]
    ),
    "must be a lowercase DNS subdomain name: letters, digits, '-' and '.', such as my-name": st.one_of(
        st.sampled_from(["Bad", "under_score", "-lead", "trail-", "a..b", "sp ace", "ünï", ".x"]),
        st.from_regex(r"\A[a-z]{1,5}[A-Z_ !/][a-z]{1,5}\Z"),
    ),
    "must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit": (
        st.sampled_from(["-x", "x-", "a b", "a/b", "é", "_x"])
    ),
    "keys must be label keys such as example.com/pool or kubernetes.io/arch": st.sampled_from(
        [{"bad key": "v"}, {"-x": "v"}, {"Example.com/x": "v"}, {"a/b/c": "v"}, {"x" * 64: "v"}, {"/x": "v"}]
    ),
    "must be a taint key such as nvidia.com/gpu": st.sampled_from(["bad key", "-x", "a/b/c", "x" * 64, "UPPER.com/x"]),
    "must consist of printable ASCII characters other than '='": st.sampled_from(
        ["A=B", "=", "tab\there", "new\nline", "ünïcode", "\x7f"]
    ),
    "must be a Secret key: letters, digits, '-', '_' or '.'": st.sampled_from(["a b", "a/b", "ключ", "a:b"]),
    "must be a ConfigMap key: letters, digits, '-', '_' or '.'": st.sampled_from(["a b", "a/b", "ключ", "a:b"]),
    "must be a registry host and optional port, such as registry.models.svc:5000 or 10.0.0.5:5000, without a "
    "scheme (http://) or a path": st.sampled_from(
        ["http://reg:5000", "reg:5000/library", "Registry.Example", "reg:", "reg:abc", "reg host", "-reg", "reg:5:6"]
    ),
    "the registry's port must be a number from 1 to 65535": st.sampled_from(["reg:0", "reg:65536", "r.svc:99999"]),
    "must be an http:// or https:// URL such as http://hf-mirror.models.svc:8090": st.sampled_from(
        ["hf-mirror:8090", "ftp://hub", "//hub", "http://", "not a url", "file:///etc/passwd", "http//hub"]
    ),
    "set one of registry (an OCI registry for Ollama) or huggingFaceEndpoint (a Hugging Face hub for vLLM)": (
        st.sampled_from(
            [
                {"caConfigMapRef": {"name": "ca", "key": "ca.crt"}},
                {"registry": "reg:5000", "huggingFaceEndpoint": "http://hub:8090"},
            ]
        )
    ),
    "insecure applies to a registry; a Hugging Face endpoint says http:// or https:// itself": (
        st.just({"huggingFaceEndpoint": "http://hub:8090", "insecure": True})
    ),
    "insecure (plain HTTP) and caConfigMapRef (HTTPS with a private CA) exclude each other: set one of them": (
        st.just({"registry": "reg:5000", "insecure": True, "caConfigMapRef": {"name": "ca", "key": "ca.crt"}})
    ),
    "must be a model name such as phi3:mini: no control characters, no surrounding spaces": st.one_of(
        st.sampled_from(
            [" phi3", "phi3 ", "phi\n3", "phi3\t", "\x00", " ", "a\x1fb", "a\x7f", "a\x85b", "\u00a0phi", "phi\u2028"]
        ),
        st.text(alphabet=string.whitespace, min_size=1, max_size=4),
    ),
    "must be an image reference such as docker.io/ollama/ollama:0.17.4": st.sampled_from(
        [" ollama", "ollama ", "oll ama", "ollama\n", "\t"]
    ),
    "must be an http:// or https:// URL such as http://ollama.models.svc:11434": st.sampled_from(
        ["ftp://x", "ollama:11434", "//host", "http://", "not a url", "file:///etc/passwd", "http//x"]
    ),
    "the port must be a number from 1 to 65535": st.one_of(
        st.integers(min_value=65536, max_value=99999).map(lambda port: f"http://h:{port}"),
        st.just("http://h:0"),
        st.just("http://h:123456"),
    ),
    "must not carry credentials (user:password@); put the API key in apiKeySecretRef": st.sampled_from(
        ["http://user:secret@ollama:11434", "https://token@api.example.com/v1"]
    ),
    "a toleration without a key must use operator Exists (it then matches every taint)": st.sampled_from(
        [{"operator": "Equal", "value": "v"}, {"key": "", "operator": "Equal"}, {"effect": "NoSchedule"}]
    ),
    "a toleration with operator Exists must not set a value": st.sampled_from(
        [{"key": "k", "operator": "Exists", "value": "v"}]
    ),
    "tolerationSeconds applies only to effect NoExecute": st.sampled_from(
        [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}, {"key": "k", "tolerationSeconds": 5}]
    ),
    "set value or valueFrom, not both": st.sampled_from(
        [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    ),
}


def walk(base: Json, node: dict[str, Any], path: Path = ()) -> Iterator[tuple[Path, dict[str, Any], Any]]:
    """(path, schema node, value) of every value present in `base`, depth first."""
    yield path, node, base
    if isinstance(base, dict) and "properties" in node:
        for key, value in base.items():
            yield from walk(value, node["properties"][key], (*path, key))
    elif isinstance(base, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, value in base.items():
            yield from walk(value, node["additionalProperties"], (*path, MapKey(key)))
    elif isinstance(base, list) and base:
        yield from walk(base[0], node["items"], (*path, 0))


def too_many(node: dict[str, Any], value: Json, limit: int) -> Json:
    if isinstance(value, dict):
        return {f"k{i}": "v" for i in range(limit + 1)}
    if node["items"].get("type") == "string":
        return [f"x{i}" for i in range(limit + 1)]
    return [copy.deepcopy(value[0]) for _ in range(limit + 1)]


def field_mutations(base: Json, schema: dict[str, Any]) -> Iterator[Mutation]:
    for path, node, value in walk(base, schema):
        where = path_text(("spec", *path))
        kind = "int-or-string" if node.get("x-kubernetes-int-or-string") else node.get("type", "object")
        # A large fraction in an int-or-string field gets "expected XIntOrString value to be either a
        # string or integer" instead of the usual type message.
        type_word = {"int-or-string": "integer,string|either a string or integer"}.get(kind, kind)
        yield Mutation(f"{where}-wrong-type", base, path, wrong_types(kind), f"must be of type {type_word}")
        if "minimum" in node:
            low = node["minimum"]
            yield Mutation(
                f"{where}-below-minimum", base, path, st.integers(-(2**62), low - 1), f"greater than or equal to {low}"
            )
        if "maximum" in node:
            high = node["maximum"]
            yield Mutation(
                f"{where}-above-maximum", base, path, st.integers(high + 1, 2**62), f"less than or equal to {high}"
            )
        if "enum" in node:
            allowed = node["enum"]
            strangers = st.text(max_size=12).filter(lambda v, allowed=allowed: v not in allowed)
            yield Mutation(
                f"{where}-not-in-enum",
                base,
                path,
                strangers,
                "supported values: " + ", ".join(json.dumps(v) for v in allowed),
            )
        if "maxLength" in node:
            longest = node["maxLength"]
            letters = st.text(alphabet=string.ascii_lowercase, min_size=longest + 1, max_size=longest + 8)
            yield Mutation(f"{where}-too-long", base, path, letters, f"{longest}")
        if node.get("minLength", 0) > 0:
            yield Mutation(f"{where}-empty", base, path, st.just(""), f"at least {node['minLength']} chars long")
        for limit_key in ("maxItems", "maxProperties"):
            if limit_key in node:
                limit = node[limit_key]
                yield Mutation(f"{where}-too-many", base, path, st.just(too_many(node, value, limit)), f"{limit}")
        if node.get("x-kubernetes-list-type") in ("set", "map"):
            yield Mutation(f"{where}-duplicate", base, path, st.just([value[0], value[0]]), "Duplicate value")
        if node.get("type") == "object" and "properties" in node:
            yield Mutation(
                f"{where}-unknown-field",
                base,
                path,
                st.just({**value, "bogusField": 1}),
                f'unknown field "{where}.bogusField"',
                status=400,
            )
            for required in node.get("required", []):
                yield Mutation(
                    f"{where}.{required}-missing", base, (*path, required), st.just(DELETE), "Required value"
                )
        for rule in node.get("x-kubernetes-validations", []):
            message = rule["message"]
            if message in BREAKING:
                yield Mutation(f"{where}-rule-{slug(message)}", base, path, BREAKING[message], message)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def cross_field_mutations() -> Iterator[Mutation]:
    """The spec-level CEL rules, each with specs that break it, and the field its message must name."""
    endpoint_url = {"url": "http://127.0.0.1:11434"}
    cases: list[tuple[str, list[Json], str, str]] = [
        (
            "no-runtime-no-endpoint",
            [{"model": "m"}, {"model": "m", "replicas": 2}],
            "spec.runtime",
            "spec.runtime is required (ollama or vllm)",
        ),
        (
            "endpoint-with-managed-fields",
            [
                {"model": "m", "endpoint": endpoint_url, key: {**MANAGED_BASE, **OLLAMA_BASE}[key]}
                for key in (
                    "runtime",
                    "image",
                    "resources",
                    "scheduling",
                    "cache",
                    "engine",
                    "autoscaling",
                    "source",
                    "adapters",
                )
            ],
            "spec.endpoint",
            "remove runtime, image, resources (GPUs), scheduling, cache, engine, autoscaling, source and adapters",
        ),
        (
            "source-on-vllm",
            [
                {**MANAGED_BASE, "source": OLLAMA_BASE["source"]},
                {"runtime": "vllm", "model": "m", "source": {"registry": "r:5000"}},
            ],
            "spec",
            "spec.source.registry is an OCI registry of Ollama models and needs runtime ollama",
        ),
        (
            "hub-source-on-ollama",
            [
                {**OLLAMA_BASE, "source": {"huggingFaceEndpoint": "http://hub.models.svc:8090"}},
                {"runtime": "ollama", "model": "m", "source": {"huggingFaceEndpoint": "https://hub"}},
            ],
            "spec",
            "spec.source.huggingFaceEndpoint is a Hugging Face hub and needs runtime vllm",
        ),
        (
            "min-above-max",
            [
                mutated(MANAGED_BASE, ("autoscaling",), {"minReplicas": low, "maxReplicas": high})
                for low, high in ((2, 1), (1000, 999), (5, 4))
            ],
            "spec.autoscaling.minReplicas",
            "must not exceed spec.autoscaling.maxReplicas",
        ),
        (
            "zero-replicas-on-engine-metric",
            [
                mutated(MANAGED_BASE, ("autoscaling",), {**MANAGED_BASE["autoscaling"], "minReplicas": 0}),
                {
                    "runtime": "vllm",
                    "model": "m",
                    "autoscaling": {"enabled": True, "minReplicas": 0, "metric": "engine"},
                },
            ],
            "spec.autoscaling.minReplicas",
            "minReplicas 0 needs metric 'router'",
        ),
        (
            "engine-metric-on-ollama",
            [
                {"runtime": "ollama", "model": "m", "autoscaling": {"enabled": True, "metric": "engine"}},
                {**ENDPOINT_BASE, "autoscaling": {"metric": "engine"}},
            ],
            "spec.autoscaling.metric",
            "needs runtime vllm",
        ),
    ]
    for label, specs, where, expect in cases:
        yield Mutation(f"spec-{label}", {}, (), st.sampled_from(specs), expect, expect_path=where)


def name_mutation() -> Mutation:
    """metadata.name must fit the Service name im-<name>: a DNS label of at most 60 characters."""
    too_long = st.integers(61, 253).map(lambda n: "a" * n)
    dotted = st.from_regex(r"\A[a-z]{1,10}\.[a-z]{1,10}\Z")
    return Mutation(
        "metadata.name",
        {},
        ("name",),
        st.one_of(too_long, dotted),
        "metadata.name must be at most 60",
        expect_path="metadata.name",
    )


def all_mutations() -> list[Mutation]:
    schema = crd_spec_schema()
    found = [
        *field_mutations(MANAGED_BASE, schema),
        *field_mutations(OLLAMA_BASE, schema),
        *field_mutations(ENDPOINT_BASE, schema),
    ]
    unique = {mutation.label: mutation for mutation in found}  # the serving fields appear in one base only
    return [*unique.values(), *cross_field_mutations(), name_mutation()]


MUTATIONS = all_mutations()


def test_every_field_rule_has_breaking_values() -> None:
    """A CEL rule added to the API without values that break it would go unfuzzed."""
    messages: set[str] = set()

    def collect(node: dict[str, Any]) -> None:
        messages.update(rule["message"] for rule in node.get("x-kubernetes-validations", []))
        for child in (node.get("properties") or {}).values():
            collect(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                collect(node[key])

    schema = crd_spec_schema()
    for child in schema["properties"].values():
        collect(child)
    assert messages - set(BREAKING) == set()
    assert len(MUTATIONS) > 100, len(MUTATIONS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.label for m in MUTATIONS])
def test_invalid_spec_is_refused_naming_the_field(cluster: Cluster, fuzz_namespace: str, mutation: Mutation) -> None:
    @fuzz_settings(max_examples=5)
    @given(value=mutation.values)
    def refused(value: Any) -> None:
        name, spec = "fuzzed", mutated(mutation.base, mutation.path, value)
        if mutation.label == "metadata.name":
            name, spec = value, MANAGED_BASE
        with pytest.raises(ApiException) as error:
            # Strict decoding reports a wrong type inside a map as an unknown field; only unknown-field
            # mutations ask for it.
            create_model(cluster, fuzz_namespace, name, spec, strict=mutation.status == 400)
        message, causes = refusal(error.value)
        context = f"{mutation.label} with {value!r}: {error.value.status} {message}"
        assert error.value.status == mutation.status, context
        named = any(where in message or where in causes for where in mutation.field_paths)
        assert named, f"no field path: {context}"
        said = any(text.lower() in message.lower() for text in mutation.expect.split("|"))
        assert said, f"does not say what is expected: {context}"

    refused()


# Odd but valid specs ------------------------------------------------------------------------------

NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?){0,3}"

label_keys = st.one_of(
    st.from_regex(rf"\A{NAME_PART}\Z"),
    st.from_regex(rf"\A{DNS_SUBDOMAIN}/{NAME_PART}\Z"),
    st.sampled_from(["kubernetes.io/arch", "node.kubernetes.io/instance-type", "a", "A.b_c-D"]),
)
label_values = st.one_of(st.just(""), st.from_regex(rf"\A{NAME_PART}\Z"), st.just("v" * 63))
# No control characters, no white space at the ends; anything else, unicode included.
printable = st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"))
model_names = st.one_of(
    st.sampled_from(
        [
            "a",
            "phi3:mini",
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "library/llama3:8b-instruct-q4_0",
            "Qwen/Qwen2.5-7B-Instruct-AWQ",
            "/models/my model/weights",
            "模型:最新",
            "🦙:latest",
            "m" * 512,
            "é" * 512,
            "a b",
            "x:y:z@sha256:abc",
        ]
    ),
    st.text(alphabet=printable, min_size=1, max_size=40),
)
quantities = st.one_of(
    st.integers(0, 2**40),
    st.builds(
        lambda number, suffix: f"{number}{suffix}",
        st.one_of(st.integers(0, 10**6), st.sampled_from(["0.5", "1.25", "+3", ".5"])),
        st.sampled_from(["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]),
    ),
    st.sampled_from(["1e3", "2E2", "1e-3", "0", "0m"]),  # exponents take no suffix
)
positive_quantities = st.one_of(
    st.integers(1, 2**40),
    st.builds(
        lambda number, suffix: f"{number}{suffix}",
        st.integers(1, 10**4),
        st.sampled_from(["", "k", "M", "G", "Ki", "Mi", "Gi", "Ti"]),
    ),
)
env_names = st.one_of(
    st.from_regex(r"\A[ -<>-~]{1,20}\Z"),
    st.sampled_from(["A", "dotted.name", "_x", "with space", "x" * 256, "HOME", "OLLAMA_KEEP_ALIVE", "HF_HOME"]),
)


# Values YAML is fussy about (the operator's apply body is read as YAML): every character may appear.
env_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["🦙", "\x7f", "\x85", "\u2028\u2029", "\ufeff", "\x00", "a\\ud83e", "'\"", "- x: [y]"]),
)


@st.composite
def tolerations(draw: st.DrawFn) -> Json:
    toleration: Json = {}
    exists = draw(st.booleans())
    if exists:
        toleration["operator"] = "Exists"
        if draw(st.booleans()):
            toleration["key"] = draw(label_keys)
    else:
        toleration["key"] = draw(label_keys)
        if draw(st.booleans()):
            toleration["operator"] = "Equal"
        toleration["value"] = draw(label_values)
    effect = draw(st.sampled_from([None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"]))
    if effect is not None:
        toleration["effect"] = effect
    if effect == "NoExecute" and draw(st.booleans()):
        toleration["tolerationSeconds"] = draw(st.integers(-10, 2**40))
    return toleration


AFFINITIES: list[Json] = [
    {},
    {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]
                    },
                }
            ]
        }
    },
    {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app": "x"}},
                    },
                }
            ]
        }
    },
]


@st.composite
def serving(draw: st.DrawFn, real: bool) -> Json:
    out: Json = {}
    if draw(st.booleans()):
        out["aliases"] = draw(st.lists(model_names, max_size=3, unique=True))
    for key, low, high in (("maxInFlightPerReplica", 1, 1024), ("maxQueue", 0, 100000),
                           ("requestTimeoutSeconds", 1, 86400)):  # fmt: skip
        if draw(st.booleans()):
            out[key] = draw(st.sampled_from([low, high]) | st.integers(low, high))
    if draw(st.booleans()):
        out["cache"] = {"enabled": draw(st.booleans()), "ttlSeconds": draw(st.sampled_from([1, 31536000]))}
    if draw(st.booleans()):
        out["rateLimit"] = {
            "requestsPerMinute": draw(st.integers(1, 2**63 - 1)),
            "tokensPerMinute": draw(st.sampled_from([1, 2**63 - 1])),
        }
    return out


@st.composite
def managed_specs(draw: st.DrawFn, real: bool) -> Json:
    runtime = draw(st.sampled_from(["ollama", "vllm"]))
    spec: Json = {"runtime": runtime, "model": draw(model_names)}
    if draw(st.booleans()):
        spec["image"] = draw(
            st.sampled_from(
                [
                    "ollama/ollama",
                    "registry.local:5000/team/engine@sha256:" + "a" * 64,
                    "x",
                    "r.io/" + "p" * 1000,
                ]
            )
        )
    spec["replicas"] = draw(st.integers(0, 2) if real else st.sampled_from([0, 1, 1000]) | st.integers(0, 1000))
    if draw(st.booleans()):
        resources: Json = {"gpu": draw(st.integers(0, 1) if real else st.sampled_from([0, 64]) | st.integers(0, 64))}
        if draw(st.booleans()):
            resources["gpuResource"] = draw(st.sampled_from(["nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915"]))
        if draw(st.booleans()):
            resources["cpu"] = draw(st.sampled_from(["500m", 1, "0"]) if real else quantities)
        if draw(st.booleans()):
            resources["memory"] = draw(st.sampled_from(["1Gi", "512Mi", 0]) if real else quantities)
        spec["resources"] = resources
    if draw(st.booleans()):
        scheduling: Json = {
            "nodeSelector": draw(st.dictionaries(label_keys, label_values, max_size=3)),
            "tolerations": draw(st.lists(tolerations(), max_size=3)),
            "affinity": draw(st.sampled_from(AFFINITIES)),
        }
        if not real:  # the classes need not exist for the Deployment to be accepted; its pods would wait
            scheduling["priorityClassName"] = draw(st.from_regex(rf"\A{DNS_SUBDOMAIN}\Z"))
            scheduling["runtimeClassName"] = draw(st.from_regex(rf"\A{DNS_SUBDOMAIN}\Z"))
        spec["scheduling"] = scheduling
    if draw(st.booleans()):
        cache_spec: Json = {
            "size": draw(st.sampled_from(["1", 1, "1Ki", "10Gi"]) if real else positive_quantities),
            "accessMode": draw(st.sampled_from(["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"])),
        }
        if draw(st.booleans()):
            cache_spec["existingClaim"] = draw(st.from_regex(rf"\A{DNS_SUBDOMAIN}\Z"))
        if not real and draw(st.booleans()):
            cache_spec["storageClassName"] = draw(st.from_regex(rf"\A{DNS_SUBDOMAIN}\Z"))
        if draw(st.booleans()):
            cache_spec["hfTokenSecretRef"] = {
                "name": "hf-token",
                "key": draw(st.from_regex(r"\A[-._a-zA-Z0-9]{1,20}\Z")),
            }
        spec["cache"] = cache_spec
    if draw(st.booleans()):
        env = draw(
            st.lists(
                st.builds(lambda name, value: {"name": name, "value": value}, env_names, env_values),
                max_size=3,
                unique_by=lambda var: str(var["name"]),
            )
        )
        if draw(st.booleans()) and all(var["name"] != "POD" for var in env):
            env.append({"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
        spec["engine"] = {"args": draw(st.lists(st.text(max_size=20), max_size=4)), "env": env}
    if draw(st.booleans()):
        low = draw(st.integers(0, 2) if real else st.sampled_from([0, 1000]) | st.integers(0, 1000))
        high = draw(st.sampled_from([max(1, low), 1000]) | st.integers(max(1, low), 1000))
        spec["autoscaling"] = {
            "enabled": draw(st.booleans()),
            "minReplicas": low,
            "maxReplicas": high,
            "targetQueueDepthPerReplica": draw(st.sampled_from([1, 2**63 - 1]) | st.integers(1, 2**40)),
            # An engine metric cannot bring a model back from zero replicas; the CRD refuses that pair.
            "metric": draw(st.sampled_from(["router", "engine"] if runtime == "vllm" and low > 0 else ["router"])),
            "scaleDownStabilizationSeconds": draw(st.sampled_from([0, 3600]) | st.integers(0, 3600)),
        }
    if draw(st.booleans()):
        spec["serving"] = draw(serving(real))
    return spec


@st.composite
def endpoint_specs(draw: st.DrawFn, real: bool, local_port: int = 1) -> Json:
    hosts = (
        ["127.0.0.1", "localhost", "[::1]"]
        if real
        else ["127.0.0.1", "[::1]", "ollama.models.svc", "xn--bcher-kva.example", "a-b.c.example", "10.0.0.1"]
    )
    scheme = draw(st.sampled_from(["http", "https"]))
    port = draw(st.sampled_from([local_port, 1, 65535]) if real else st.integers(1, 65535))
    url = f"{scheme}://{draw(st.sampled_from(hosts))}"
    if draw(st.booleans()):
        url += f":{port}"
    url += draw(st.sampled_from(["", "/", "/v1", "/api/?x=1#frag", "/ünï"]))
    endpoint: Json = {
        "url": url,
        "api": draw(st.sampled_from(["openai", "ollama"])),
        "allowRemote": draw(st.booleans()),
    }
    if draw(st.booleans()):
        endpoint["apiKeySecretRef"] = {"name": "backend-key", "key": "api_key"}
    spec: Json = {"model": draw(model_names), "endpoint": endpoint}
    if draw(st.booleans()):
        spec["serving"] = draw(serving(real))
    return spec


names = st.one_of(
    st.sampled_from(["a", "0", "9" * 60, "a" + "-" * 58 + "z", "x" * 60]),
    st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,58}[a-z0-9])?\Z"),
)


def context_of(stored: dict[str, Any], namespace: str) -> ModelContext:
    return ModelContext(
        name=stored["metadata"]["name"],
        namespace=namespace,
        uid=str(uuid.uuid4()),
        spec=v1alpha1.InferenceModelSpec.model_validate(stored["spec"]),
    )


def test_odd_but_valid_specs_and_their_children_are_accepted(cluster: Cluster, fuzz_namespace: str) -> None:
    checked = {"managed": 0, "endpoint": 0}

    @fuzz_settings(max_examples=300)
    @given(name=names, spec=st.one_of(managed_specs(real=False), endpoint_specs(real=False)))
    def accepted(name: str, spec: Json) -> None:
        try:
            stored = create_model(cluster, fuzz_namespace, name, spec)
        except ApiException as exc:
            pytest.fail(f"valid spec refused: {json.dumps(spec)[:2000]}: {refusal(exc)[0]}")
        context = context_of(stored, fuzz_namespace)  # what the operator parses
        if context.spec.endpoint is not None:
            checked["endpoint"] += 1
            return
        checked["managed"] += 1
        for child in all_children(context):
            try:
                dry_run_apply(cluster, child)
            except ApiException as exc:
                pytest.fail(
                    f"the schema accepts a spec whose {child['kind']} the API server refuses: "
                    f"{json.dumps(spec)[:2000]}: {refusal(exc)[0]}"
                )

    accepted()
    assert checked["managed"] > 30
    assert checked["endpoint"] > 10


# Through the operator ------------------------------------------------------------------------------


@dataclass
class Fleet:
    cluster: Cluster
    namespace: str
    created: dict[str, Json] = field(default_factory=dict)

    def create(self, name: str, spec: Json) -> None:
        create_model(self.cluster, self.namespace, name, spec, dry_run=False)
        self.created[name] = spec

    def unreconciled(self) -> list[str]:
        waiting = []
        for name in self.created:
            body = get_model(self.cluster, self.namespace, name)
            generation = body["metadata"]["generation"]
            status = body.get("status") or {}
            conditions = status.get("conditions") or []
            current = status.get("observedGeneration") == generation and conditions
            if not current or any(c.get("observedGeneration") != generation for c in conditions):
                waiting.append(name)
        return waiting


def operator_alive(operator: OperatorProcess) -> None:
    assert operator.process.process.poll() is None, f"the operator exited:\n{operator.process.log_tail(40)}"
    with urllib.request.urlopen(operator.liveness_url, timeout=5) as response:
        assert response.status == 200


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def test_operator_survives_odd_models_and_keeps_its_queue_moving(
    cluster: Cluster, operator: OperatorProcess, fuzz_namespace: str, http_endpoint: str
) -> None:
    log_start = operator.process.log_path.stat().st_size
    fleet = Fleet(cluster, fuzz_namespace)
    closed_port = free_port()
    counter = iter(range(1000))

    @fuzz_settings(max_examples=40)
    @given(
        name=names,
        spec=st.one_of(
            managed_specs(real=True),
            endpoint_specs(real=True, local_port=int(urlsplit(http_endpoint).port or 0)),
            endpoint_specs(real=True, local_port=closed_port),
        ),
    )
    def create(name: str, spec: Json) -> None:
        suffix = f"-{next(counter):03d}"
        fleet.create(name[: v1alpha1.MAX_NAME_LENGTH - len(suffix)].rstrip("-") + suffix, spec)

    create()
    # Every kind once, whatever the draw: both runtimes, both endpoint APIs, a name at the limit.
    long_name = "z" * (v1alpha1.MAX_NAME_LENGTH - 4) + "-end"
    fleet.create(long_name, {"runtime": "vllm", "model": "/models/local", "replicas": 0})
    fleet.create(
        "cover-ollama",
        {
            "runtime": "ollama",
            "model": "🦙:latest",
            "resources": {"gpu": 0},
            "engine": {"args": [], "env": []},
            "scheduling": {"nodeSelector": {}},
        },
    )
    fleet.create("cover-openai", {"model": "m", "endpoint": {"url": f"{http_endpoint}/v1"}})
    fleet.create(
        "cover-ollama-api", {"model": "m", "endpoint": {"url": f"http://[::1]:{closed_port}", "api": "ollama"}}
    )
    fleet.create(
        "cover-autoscaled",
        {
            "runtime": "vllm",
            "model": "m",
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1000, "metric": "engine"},
        },
    )
    # Specs the schema cannot fully check (pass-through Kubernetes types) and a URL urllib cannot use:
    # each must end in a failed condition that says why, not in an endless retry.
    failing = {
        "bad-affinity": (
            {
                "runtime": "ollama",
                "model": "m",
                "resources": {"gpu": 0},
                "scheduling": {
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
                    }
                },
            },
            "InvalidSpec",
            "nodeSelectorTerms",
        ),
        "bad-value-from": (
            {
                "runtime": "ollama",
                "model": "m",
                "resources": {"gpu": 0},
                "engine": {"env": [{"name": "X", "valueFrom": {}}]},
            },
            "InvalidSpec",
            "valueFrom",
        ),
        "bad-idna-host": ({"model": "m", "endpoint": {"url": "http://a..b/"}}, "EndpointUnreachable", "unusable URL"),
    }
    for name, (spec, _, _) in failing.items():
        fleet.create(name, spec)
    operator_alive(operator)

    def summary() -> str:
        rows = []
        for name in fleet.unreconciled():
            rows.append(f"{name}: {json.dumps(get_model(cluster, fuzz_namespace, name).get('status'))[:300]}")
        return "\n".join(rows) + f"\noperator log:\n{operator.process.log_tail(30)}"

    started = time.monotonic()
    try:
        wait_for(lambda: not fleet.unreconciled(), f"{len(fleet.created)} models to be reconciled", timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{summary()}") from None
    reconciled_after = time.monotonic() - started
    operator_alive(operator)

    def fails_as_expected(name: str) -> bool:
        _, reason, fragment = failing[name]
        body = get_model(cluster, fuzz_namespace, name)
        ready = condition(body, "Ready")
        phase = "Failed" if reason == "InvalidSpec" else "Pending"
        return (
            ready.get("status") == "False"
            and ready.get("reason") == reason
            and fragment in ready["message"]
            and (body["status"]["phase"] == phase)
        )

    for name, (_, reason, fragment) in failing.items():
        # A managed model's Deployment is applied once its weights are cached, so its refusal comes then.
        wait_for(lambda name=name: fails_as_expected(name), f"{name}: Ready=False {reason} naming {fragment!r}",
                 timeout=90)  # fmt: skip

    # The queue still moves: a plain model created now gets its children.
    fleet.create("sentinel", {"runtime": "ollama", "model": "sentinel:latest", "resources": {"gpu": 0}})
    apps, core = client.AppsV1Api(cluster.api), client.CoreV1Api(cluster.api)
    sentinel = ModelContext(
        name="sentinel", namespace=fuzz_namespace, uid="-", spec=v1alpha1.InferenceModelSpec(model="sentinel:latest")
    )
    wait_for(
        lambda: core.read_namespaced_service(child_name(sentinel), fuzz_namespace) is not None,
        "the sentinel's Service",
        timeout=60,
    )
    wait_for(
        lambda: apps.read_namespaced_deployment(child_name(sentinel), fuzz_namespace) is not None,
        "the sentinel's Deployment (after its prefetch Job)",
        timeout=120,
    )
    operator_alive(operator)

    problems = []
    for name, spec in fleet.created.items():
        body = get_model(cluster, fuzz_namespace, name)
        ready = condition(body, "Ready")
        if not ready.get("reason") or not ready.get("message"):
            problems.append(f"{name}: no Ready condition that says why: {body.get('status')}")
        elif ready["reason"] == "InvalidSpec" and name not in failing:
            problems.append(
                f"{name}: the schema accepted a spec the operator cannot carry out: "
                f"{json.dumps(spec)[:1500]}: {ready['message']}"
            )
    assert not problems, "\n".join(problems)
    assert not fleet.unreconciled(), summary()

    # Kopf posts a handler's failure as an Error event on the object; none may exist here.
    errors = [
        f"{event.involved_object.kind}/{event.involved_object.name}: {event.message}"
        for event in core.list_namespaced_event(fuzz_namespace).items
        if event.type not in ("Normal", "Warning")
    ]
    assert not errors, "\n".join(errors)
    # The operator watches every namespace (other tests' too): only records about this one count.
    with operator.process.log_path.open("rb") as log:
        log.seek(log_start)
        text = log.read().decode(errors="replace")
    records = re.split(r"\n(?=\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} )", text)
    for record in records:
        if fuzz_namespace in record and any(
            marker in record for marker in ("Traceback", "Unhandled", "failed with an exception", "Will retry")
        ):
            raise AssertionError(f"the operator failed on a fuzzed model (reconciled in {reconciled_after:.0f}s):\n"
                                 + record[:4000])  # fmt: skip
