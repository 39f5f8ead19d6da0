"""`make bench`: the router and the operator measured against baselines taken in the same run.

    python -m hack.bench.run [--quick] [--out bench-results.json]
                             [--only overhead,cache,streams,model,operator,fairness,prefix_affinity,
                                     prefix_affinity_vllm,peers]

Each comparison alternates A and B in one invocation and reports ratios. The load generator and
the fake upstream are Go programs (hack/bench/loadgen, hack/bench/upstream) so that the Python
router is what is measured; the load generator reports its own CPU use. Everything listens on
127.0.0.1 and stops by itself. Results go to bench-results.json and bench-results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hack import ollama_model
from hack.bench.affinity import bench_prefix_affinity, bench_prefix_affinity_vllm
from hack.bench.affinity import rows as affinity_rows
from hack.bench.harness import (
    BENCH_MODEL,
    CHAT,
    LOOPBACK,
    PYTHON,
    REPO,
    Result,
    build_go_tools,
    free_port,
    http_ok,
    loadgen,
    log,
    median_of,
    p90,
    parse_proc_stat,
    router,
    running,
    upstream,
)
from hack.bench.peers import bench_peers
from hack.bench.peers import rows as peers_rows
from hack.bench.peers import summary as peers_summary


def compare(direct: list[Result], routed: list[Result], router_cpu_cores: float | None) -> Result:
    """Medians of alternating direct and routed runs, and what the router adds."""
    entry: Result = {
        "direct_rps": median_of(direct, "rps"),
        "router_rps": median_of(routed, "rps"),
        "direct_p50_ms": median_of(direct, "latency_ms", "p50"),
        "direct_p99_ms": median_of(direct, "latency_ms", "p99"),
        "router_p50_ms": median_of(routed, "latency_ms", "p50"),
        "router_p99_ms": median_of(routed, "latency_ms", "p99"),
        "router_errors": sum(run["errors"] for run in routed),
        "router_cpu_cores": router_cpu_cores,
        "loadgen_cpu_percent": median_of(routed, "loadgen_cpu_percent_of_one_core"),
    }
    entry["added_p50_ms"] = round(entry["router_p50_ms"] - entry["direct_p50_ms"], 3)
    entry["added_p99_ms"] = round(entry["router_p99_ms"] - entry["direct_p99_ms"], 3)
    entry["throughput_ratio"] = round(entry["router_rps"] / entry["direct_rps"], 4)
    return entry


def bench_overhead(work: Path, seconds: float, rounds: int) -> Result:
    """Direct to the upstream vs through the router (cache off), alternating: closed loop at 1, 32 and
    256 clients, then open loop at fixed rates below saturation (as TensorZero measured LiteLLM at
    100 QPS), which shows the added latency of a router that is not queueing."""
    results: Result = {}
    loads = [(f"c{n}", ("-concurrency", str(n))) for n in (1, 32, 256)]
    loads += [(f"rate{r}", ("-rate", str(r))) for r in (100, 500)]
    with upstream(work) as direct_base, router(work, direct_base, cache_size="0") as (router_base, process):
        for name, load in loads:
            direct, routed = [], []
            cpu_before, routed_seconds = process.cpu_seconds(), 0.0
            for _ in range(rounds):
                args = (*load, "-duration", f"{seconds}s")
                direct.append(loadgen(f"{direct_base}/v1/chat/completions", *args))
                routed.append(loadgen(f"{router_base}/v1/chat/completions", *args))
                routed_seconds += routed[-1]["duration_s"]
            # Busy cores only mean something when the router is driven flat out (closed loop).
            cpu = round((process.cpu_seconds() - cpu_before) / routed_seconds, 3) if name.startswith("c") else None
            results[name] = compare(direct, routed, cpu)
            log(f"overhead {name}: {results[name]}")
    return results


# 2. Cache hits -----------------------------------------------------------------------------


def bench_cache(work: Path, seconds: float, rounds: int) -> Result:
    """Cache hits through the router: the in-process cache vs Redis, alternating, 32 clients."""
    redis_port = free_port()
    redis_argv = [
        shutil.which("redis-server") or "redis-server",
        "--bind",
        LOOPBACK,
        "--port",
        str(redis_port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(work),
    ]
    pinned = {**CHAT, "temperature": 0}

    def redis_ready() -> bool:
        with socket.create_connection((LOOPBACK, redis_port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    results: Result = {}
    with (
        upstream(work) as upstream_base,
        running("redis", redis_argv, work, redis_ready),
        router(work, upstream_base) as (memory_base, _),
        router(work, upstream_base, redis_url=f"redis://{LOOPBACK}:{redis_port}/0") as (redis_base, _),
    ):
        runs: dict[str, list[Result]] = {"memory": [], "redis": []}
        for base in (memory_base, redis_base):
            loadgen(f"{base}/v1/chat/completions", "-concurrency", "1", "-duration", "1s", body=pinned)  # prime
        for _ in range(rounds):
            for name, base in (("memory", memory_base), ("redis", redis_base)):
                args = ("-concurrency", "32", "-duration", f"{seconds}s")
                runs[name].append(loadgen(f"{base}/v1/chat/completions", *args, body=pinned))
        for name, name_runs in runs.items():
            results[name] = {
                "rps": median_of(name_runs, "rps"),
                "p50_ms": median_of(name_runs, "latency_ms", "p50"),
                "p99_ms": median_of(name_runs, "latency_ms", "p99"),
                "errors": sum(run["errors"] for run in name_runs),
            }
        for name, base in (("memory", memory_base), ("redis", redis_base)):
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                cache = json.load(response)["cache"]
            results[name]["hits"], results[name]["misses"] = cache["hits"], cache["misses"]
        # One request at a time: the latency of a hit without queueing, as the seed projects measured it.
        for name, base in (("memory", memory_base), ("redis", redis_base)):
            single = loadgen(
                f"{base}/v1/chat/completions", "-concurrency", "1", "-duration", f"{seconds}s", body=pinned
            )
            results[name]["c1_p50_ms"] = single["latency_ms"]["p50"]
            results[name]["c1_mean_ms"] = single["latency_ms"]["mean"]
        log(f"cache: {results}")
    return results


# 3. Streaming scale ------------------------------------------------------------------------


def bench_streams(work: Path, streams: int, rounds: int) -> Result:
    """`streams` concurrent SSE streams (20 chunks, 50 ms apart), direct vs through one router process."""
    results: Result = {}
    with (
        upstream(work, chunks=20, interval="50ms") as upstream_base,
        router(work, upstream_base, cache_size="0") as (router_base, process),
    ):
        body = {**CHAT, "stream": True}
        direct, routed = [], []
        for _ in range(rounds):
            direct.append(
                loadgen(f"{upstream_base}/v1/chat/completions", "-mode", "stream", "-streams", str(streams), body=body)
            )
            routed.append(
                loadgen(f"{router_base}/v1/chat/completions", "-mode", "stream", "-streams", str(streams), body=body)
            )
        results = {
            "streams": streams,
            "router_failed_streams": sum(run["errors"] for run in routed),
            "router_completed_streams": sum(run["requests"] for run in routed),
            "direct_failed_streams": sum(run["errors"] for run in direct),
            "router_peak_rss_mb": round(process.rss_peak_mb(), 1),
            "direct_ttft_p50_ms": median_of(direct, "ttft_ms", "p50"),
            "direct_ttft_p99_ms": median_of(direct, "ttft_ms", "p99"),
            "router_ttft_p50_ms": median_of(routed, "ttft_ms", "p50"),
            "router_ttft_p99_ms": median_of(routed, "ttft_ms", "p99"),
            "direct_gap_p50_ms": median_of(direct, "chunk_gap_ms", "p50"),
            "direct_gap_p99_ms": median_of(direct, "chunk_gap_ms", "p99"),
            "router_gap_p50_ms": median_of(routed, "chunk_gap_ms", "p50"),
            "router_gap_p99_ms": median_of(routed, "chunk_gap_ms", "p99"),
            "first_errors": [error for run in routed for error in run.get("first_errors") or []][:5],
        }
        results["ttft_overhead_p50_ms"] = round(results["router_ttft_p50_ms"] - results["direct_ttft_p50_ms"], 3)
        results["ttft_overhead_p99_ms"] = round(results["router_ttft_p99_ms"] - results["direct_ttft_p99_ms"], 3)
        results["chunk_gap_added_p50_ms"] = round(results["router_gap_p50_ms"] - results["direct_gap_p50_ms"], 3)
        results["chunk_gap_added_p99_ms"] = round(results["router_gap_p99_ms"] - results["direct_gap_p99_ms"], 3)
        log(f"streams: {results}")
    return results


# 4. Real model -----------------------------------------------------------------------------


def stream_tokens(base_url: str, model: str, tokens: int) -> tuple[float, float, int]:
    """(TTFT seconds, tokens/s after the first token, completion tokens) of one streamed chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}],
        "max_tokens": tokens,
        "temperature": 0,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-cache"},
    )
    started = time.monotonic()
    first = last = 0.0
    completion = 0
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    now = time.monotonic()
                    first = first or now
                    last = now
    return first - started, (completion - 1) / (last - first), completion


def bench_model(work: Path, rounds: int, tokens: int) -> Result:
    store = ollama_model.prepare()
    models_dir = ollama_model.link_copy(store, work / "models")
    with (
        ollama_model.serve(models_dir, work / "ollama") as ollama,
        router(work, ollama.base_url, upstream_model=BENCH_MODEL) as (router_base, _),
    ):
        create = {"model": BENCH_MODEL, "from": ollama_model.MODEL_NAME, "parameters": {"num_thread": 1},
                  "stream": False}  # fmt: skip
        ollama_model.http_json(f"{ollama.base_url}/api/create", create)
        # The router's model is "bench"; Ollama's is gemma3-bench. The warm-up loads the model.
        runs: dict[str, list[tuple[float, float, int]]] = {"direct": [], "router": []}
        stream_tokens(ollama.base_url, BENCH_MODEL, 8)
        for _ in range(rounds):
            runs["direct"].append(stream_tokens(ollama.base_url, BENCH_MODEL, tokens))
            runs["router"].append(stream_tokens_via_router(router_base, tokens))
        log(f"model runs (ttft s, tokens/s, tokens): {runs}")
    result: Result = {
        name: {
            "ttft_ms": round(statistics.median(r[0] for r in values) * 1000, 1),
            "tokens_per_s": round(statistics.median(r[1] for r in values), 2),
            "completion_tokens": statistics.median(r[2] for r in values),
        }
        for name, values in runs.items()
    }
    result["tokens_per_s_ratio"] = round(result["router"]["tokens_per_s"] / result["direct"]["tokens_per_s"], 4)
    result["ttft_added_ms"] = round(result["router"]["ttft_ms"] - result["direct"]["ttft_ms"], 1)
    log(f"model: {result}")
    return result


# Fairness: one slot, a key that floods and a light key -------------------------------------------

FLOOD_KEY, LIGHT_KEY = "mf-bench-flood", "mf-bench-light"


def respond(router_base: str, key: str) -> tuple[float, float, int]:
    """(seconds to the whole answer, seconds in the router's queue, output tokens) of one short answer."""
    body = {"model": "bench", "input": "Name a fruit.", "max_output_tokens": 16, "temperature": 0}
    request = urllib.request.Request(
        f"{router_base}/v1/responses", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )  # fmt: skip
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    return time.monotonic() - started, answer["timings"]["queue_ms"] / 1000, int(answer["usage"]["output_tokens"])


def queue_depth(router_base: str) -> float:
    with urllib.request.urlopen(f"{router_base}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("modelfleet_queue_depth{"))


def jain_index(served: dict[str, float], demand: dict[str, float]) -> float:
    """Jain's index of what each key was served against its max-min fair share of what was served in all.

    1.0 is perfectly fair: a key that asks for less than an equal share gets all it asks for, and the
    other gets the rest.
    """
    total, keys = sum(served.values()), sorted(served)
    share: dict[str, float] = {}
    left, open_keys = total, list(keys)
    for key in sorted(keys, key=lambda k: demand[k]):
        share[key] = min(demand[key], left / len(open_keys))
        left -= share[key]
        open_keys.remove(key)
    ratios = [served[key] / share[key] for key in keys if share[key] > 0]
    return round(sum(ratios) ** 2 / (len(ratios) * sum(r * r for r in ratios)), 4) if ratios else 0.0


def light_key_phase(router_base: str, seconds: float, flooders: int) -> Result:
    """The light key's answers, one a second for `seconds`, while `flooders` clients of the flood key
    each send one request after another (none: the unloaded baseline)."""
    stop = threading.Event()
    # (key, when the answer ended, output tokens): Jain's index counts what was served within the window.
    answers: list[tuple[str, float, int]] = []
    lock = threading.Lock()

    def flood() -> None:
        while not stop.is_set():
            _, _, tokens = respond(router_base, FLOOD_KEY)
            with lock:
                answers.append(("flood", time.monotonic(), tokens))

    light: list[tuple[float, float, int]] = []

    def one_light() -> None:
        result = respond(router_base, LIGHT_KEY)
        with lock:
            light.append(result)
            answers.append(("light", time.monotonic(), result[2]))

    flooding = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
    for thread in flooding:
        thread.start()
    if flooders:
        deadline = time.monotonic() + 60
        while queue_depth(router_base) < flooders - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    sent = []
    started = time.monotonic()
    for index in range(int(seconds)):
        time.sleep(max(0.0, started + index - time.monotonic()))
        thread = threading.Thread(target=one_light)
        thread.start()
        sent.append(thread)
    window_end = started + seconds
    for thread in sent:
        thread.join(timeout=600)
    stop.set()
    for thread in flooding:
        thread.join(timeout=600)
    latencies, waits = [r[0] for r in light], [r[1] for r in light]
    served = {key: float(sum(t for k, at, t in answers if k == key and at <= window_end)) for key in ("flood", "light")}
    result: Result = {
        "light_requests": len(light),
        "light_latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "light_latency_p90_ms": round(p90(latencies) * 1000, 1),
        "light_queue_wait_p90_ms": round(p90(waits) * 1000, 1),
        "tokens_served_in_window": served,
    }
    if flooders:
        # Within the window the light key asked for its requests' tokens; the flood for more than all.
        asked = len(sent) * statistics.mean(r[2] for r in light)
        result["jain_index"] = jain_index(served, {"light": asked, "flood": float("inf")})
    return result


def bench_fairness(work: Path, seconds: float, flooders: int = 16) -> Result:
    store = ollama_model.prepare()
    models_dir = ollama_model.link_copy(store, work / "fairness-models")
    keys = work / "fairness-keys.yaml"
    keys.write_text(json.dumps({"keys": [{"name": "flood", "key": FLOOD_KEY}, {"name": "light", "key": LIGHT_KEY}]}))
    one_slot = {"max_in_flight": 1, "max_queue": 64, "request_timeout_seconds": 600}
    result: Result = {"flooders": flooders, "seconds": seconds}
    with ollama_model.serve(models_dir, work / "fairness-ollama") as ollama:
        create = {"model": BENCH_MODEL, "from": ollama_model.MODEL_NAME, "parameters": {"num_thread": 1},
                  "stream": False}  # fmt: skip
        ollama_model.http_json(f"{ollama.base_url}/api/create", create)
        stream_tokens(ollama.base_url, BENCH_MODEL, 8)  # loads the model
        for phase, policy, load in (("unloaded", "fair", 0), ("fifo", "fifo", flooders), ("fair", "fair", flooders)):
            with router(work, ollama.base_url, upstream_model=BENCH_MODEL, model_settings=one_slot,
                        queue_policy=policy, auth_required="true", api_keys_file=str(keys),
                        cache_size="0") as (base, _):  # fmt: skip
                result[phase] = light_key_phase(base, seconds, load)
            log(f"fairness {phase}: {result[phase]}")
    unloaded = result["unloaded"]["light_latency_p90_ms"]
    for phase in ("fifo", "fair"):
        result[phase]["light_latency_p90_ratio"] = round(result[phase]["light_latency_p90_ms"] / unloaded, 2)
    # The light key's wait for its answer: queue plus generation, since unloaded it waits in no queue at all.
    result["light_key_wait_p90_ratio"] = result["fair"]["light_latency_p90_ratio"]
    return result


def stream_tokens_via_router(router_base: str, tokens: int) -> tuple[float, float, int]:
    return stream_tokens(router_base, "bench", tokens)


# 5. Operator scale -------------------------------------------------------------------------


def kubectl(*args: str, input_text: str | None = None) -> str:
    argv = [str(REPO / ".cache" / "bin" / "kubectl"), "--kubeconfig", str(REPO / ".cache" / "kubeconfig"), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=True, input=input_text, timeout=300).stdout


# Where each kind is listed; raw JSON through one keep-alive client, not a kubectl process per
# poll: the local API server shares the two cores with the operator being measured.
LIST_PATHS = {
    "services": "/api/v1/namespaces/{ns}/services",
    "persistentvolumeclaims": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "jobs": "/apis/batch/v1/namespaces/{ns}/jobs",
    "deployments": "/apis/apps/v1/namespaces/{ns}/deployments",
    "inferencemodels": "/apis/modelfleet.io/v1alpha1/namespaces/{ns}/inferencemodels",
}


def api_client() -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(REPO / ".cache" / "kubeconfig"))  # type: ignore[no-untyped-call]


def count_ready(namespace: str, kind: str, client: Any = None) -> tuple[int, list[dict[str, Any]]]:
    client = client or api_client()
    request = client.param_serialize(
        method="GET",
        resource_path=LIST_PATHS[kind].format(ns=namespace),
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = client.call_api(*request)
    response.read()
    items: list[dict[str, Any]] = json.loads(response.data)["items"]
    return len(items), items


def bench_operator(work: Path, models: int, steady_seconds: float) -> Result:
    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True, capture_output=True)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    health, metrics_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(work),
        "KUBECONFIG": str(REPO / ".cache" / "kubeconfig"),
        "MODELFLEET_OPERATOR_STANDALONE": "true",
        "MODELFLEET_OPERATOR_NAMESPACES": json.dumps([namespace]),
        "MODELFLEET_OPERATOR_LIVENESS_HOST": LOOPBACK,
        "MODELFLEET_OPERATOR_LIVENESS_PORT": str(health),
        "MODELFLEET_OPERATOR_METRICS_HOST": LOOPBACK,
        "MODELFLEET_OPERATOR_METRICS_PORT": str(metrics_port),
    }
    documents = [
        {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": f"m{i:03d}", "namespace": namespace},
            "spec": {
                "runtime": "ollama",
                "model": f"bench-{i}",
                # CPU models that may also use the GPU nodes: 200 pods exceed one node's 110-pod limit.
                "resources": {"gpu": 0, "cpu": "10m", "memory": "64Mi"},
                "scheduling": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
                },
                "cache": {"size": "1Gi"},
            },
        }
        for i in range(models)
    ]
    result: Result = {"models": models}
    try:
        with running(
            "operator",
            [PYTHON, "-m", "modelfleet.operator"],
            work,
            lambda: http_ok(f"http://{LOOPBACK}:{health}/healthz"),
            env=env,
        ) as operator:
            apiserver_before = apiserver_metrics()
            cpu_before, operator_cpu_before = cpu_sample(), operator.cpu_seconds()
            applied = time.monotonic()
            kubectl("apply", "--server-side", "-f", "-", input_text="\n---\n".join(json.dumps(d) for d in documents))
            result["apply_s"] = round(time.monotonic() - applied, 2)
            milestones = {"children_s": False, "deployments_s": False, "ready_s": False}
            deadline = applied + 300
            kube = api_client()
            ready = 0
            while not all(milestones.values()) and time.monotonic() < deadline:
                now = round(time.monotonic() - applied, 2)
                if (
                    not milestones["children_s"]
                    and min(
                        count_ready(namespace, kind, kube)[0] for kind in ("services", "persistentvolumeclaims", "jobs")
                    )
                    >= models
                ):
                    milestones["children_s"] = True
                    result["children_s"] = now
                    # The API server's own view of those seconds: is it the limit?
                    result["apiserver_until_children"] = apiserver_load(apiserver_before, apiserver_metrics(), now)
                    # And the machine's: is the cluster out of CPU, and who spends it?
                    result["cpu_cores_until_children"] = cpu_load(
                        cpu_before, cpu_sample(), now, operator=operator.cpu_seconds() - operator_cpu_before
                    )
                    result["operator_requests_until_children"] = operator_requests(metrics_port)
                if not milestones["deployments_s"] and count_ready(namespace, "deployments", kube)[0] >= models:
                    milestones["deployments_s"] = True
                    result["deployments_s"] = now
                _, items = count_ready(namespace, "inferencemodels", kube)
                ready = sum(
                    any(
                        c["type"] == "Ready" and c["status"] == "True"
                        for c in (item.get("status") or {}).get("conditions") or []
                    )
                    for item in items
                )
                if not milestones["ready_s"] and ready >= models:
                    milestones["ready_s"] = True
                    result["ready_s"] = now
                time.sleep(0.5)
            result["ready_models"] = ready
            # Steady means settled: the last pods' and status changes still bring child events (and
            # reconciles that read) for a while after every model is Ready. Measure once a whole
            # resync interval has passed without any.
            result["settled_s"] = settle(metrics_port, quiet_seconds=30.0, limit_seconds=180.0, since=applied)
            versions_before = resource_versions(namespace)
            requests_before = operator_requests(metrics_port)
            time.sleep(steady_seconds)
            requests_after = operator_requests(metrics_port)
            versions_after = resource_versions(namespace)
            per_minute = 60 / steady_seconds
            result["steady_state_requests_per_min"] = {
                verb: round((requests_after.get(verb, 0) - requests_before.get(verb, 0)) * per_minute, 1)
                for verb in sorted(set(requests_after) | set(requests_before))
            }
            result["steady_state_seconds"] = steady_seconds
            result["steady_state_writes"] = sum(
                1 for key, version in versions_after.items() if versions_before.get(key) != version
            )
            result["operator_peak_rss_mb"] = round(operator.rss_peak_mb(), 1)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            kubectl("delete", "namespace", namespace, "--wait=false")
    log(f"operator: {result}")
    return result


def settle(metrics_port: int, quiet_seconds: float, limit_seconds: float, since: float) -> float | None:
    """Seconds from `since` until the operator's event-driven reconciles (child, model, coalesced) have
    stopped for `quiet_seconds`; None if they did not within `limit_seconds`."""

    def event_driven() -> float:
        counts = operator_requests(metrics_port)
        return sum(value for key, value in counts.items() if key.startswith("reconciles") and "resync" not in key)

    deadline = time.monotonic() + limit_seconds
    last, quiet_since = event_driven(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = event_driven()
        if current != last:
            last, quiet_since = current, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_seconds:
            return round(quiet_since - since, 1)
    return None


def operator_requests(metrics_port: int) -> dict[str, float]:
    """The operator's own counts: its reconciles by trigger, their API requests by verb, and those it skipped."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "modelfleet_operator_api_requests_total":
                counts[sample.labels["verb"]] = counts.get(sample.labels["verb"], 0) + sample.value
            elif sample.name == "modelfleet_operator_skipped_requests_total":
                skipped = f"{sample.labels['verb']} skipped"
                counts[skipped] = counts.get(skipped, 0) + sample.value
            elif sample.name == "modelfleet_operator_reconciles_total":
                trigger = f"reconciles ({sample.labels['trigger']})"
                counts[trigger] = counts.get(trigger, 0) + sample.value
    return counts


APISERVER_WRITES = ("POST", "PUT", "PATCH", "DELETE")
APISERVER_LABELS = {
    "cpu_cores": "CPU cores used",
    "writes_per_s": "writes per second",
    "write_latency_ms": "mean write latency ms",
    "reads_per_s": "reads per second",
    "read_latency_ms": "mean read latency ms",
    "apf_wait_ms": "mean wait in its fairness queues ms",
    "etcd_writes_per_s": "its writes to etcd per second",
    "etcd_write_latency_ms": "mean etcd write latency ms (as the API server waited for it)",
}
# The etcd operations of kube-apiserver's storage layer that write (etcd_request_duration_seconds).
ETCD_WRITES = ("create", "update", "delete")


def apiserver_sample(text: str) -> Result:
    """From kube-apiserver's own /metrics: its CPU seconds, its requests and their time by verb, its
    time waiting in API Priority and Fairness queues, and its requests to etcd and their time by operation."""
    from prometheus_client.parser import text_string_to_metric_families

    sample: Result = {"cpu_s": 0.0, "requests": {}, "seconds": {}, "apf_wait_s": 0.0, "apf_waits": 0.0,
                      "etcd_requests": {}, "etcd_seconds": {}}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            labels = metric.labels
            if metric.name == "process_cpu_seconds_total":
                sample["cpu_s"] = metric.value
            elif metric.name == "apiserver_request_duration_seconds_count" and labels.get("verb") != "WATCH":
                verb = labels["verb"]
                sample["requests"][verb] = sample["requests"].get(verb, 0.0) + metric.value
            elif metric.name == "apiserver_request_duration_seconds_sum" and labels.get("verb") != "WATCH":
                verb = labels["verb"]
                sample["seconds"][verb] = sample["seconds"].get(verb, 0.0) + metric.value
            elif metric.name == "apiserver_flowcontrol_request_wait_duration_seconds_sum":
                sample["apf_wait_s"] += metric.value
            elif metric.name == "apiserver_flowcontrol_request_wait_duration_seconds_count":
                sample["apf_waits"] += metric.value
            elif metric.name in ("etcd_request_duration_seconds_count", "etcd_request_duration_seconds_sum"):
                into = sample["etcd_requests" if metric.name.endswith("_count") else "etcd_seconds"]
                operation = labels.get("operation", "")
                into[operation] = into.get(operation, 0.0) + metric.value
    return sample


def apiserver_load(before: Result, after: Result, seconds: float) -> Result:
    """What the API server did between two samples: cores used, requests per second and their mean
    latency (reads and writes), and the mean wait in its fairness queues."""

    def delta(key: str, verbs: tuple[str, ...] | None = None) -> float:
        changes = [float(value) - float(before[key].get(verb, 0.0)) for verb, value in after[key].items()
                   if verbs is None or verb in verbs]  # fmt: skip
        return sum(changes)

    writes, reads = APISERVER_WRITES, ("GET", "LIST")
    waits = after["apf_waits"] - before["apf_waits"]
    etcd_writes = delta("etcd_requests", ETCD_WRITES)
    return {
        "seconds": round(seconds, 1),
        "cpu_cores": round((after["cpu_s"] - before["cpu_s"]) / seconds, 2),
        "writes_per_s": round(delta("requests", writes) / seconds, 1),
        "reads_per_s": round(delta("requests", reads) / seconds, 1),
        "write_latency_ms": round(1000 * delta("seconds", writes) / max(1.0, delta("requests", writes)), 1),
        "read_latency_ms": round(1000 * delta("seconds", reads) / max(1.0, delta("requests", reads)), 1),
        "apf_wait_ms": round(1000 * (after["apf_wait_s"] - before["apf_wait_s"]) / max(1.0, waits), 2),
        "etcd_writes_per_s": round(etcd_writes / seconds, 1),
        "etcd_write_latency_ms": round(1000 * delta("etcd_seconds", ETCD_WRITES) / max(1.0, etcd_writes), 1),
    }


def cpu_sample(proc: Path = Path("/proc")) -> Result:
    """The machine's busy CPU seconds (/proc/stat) and every process's own, summed by command name
    (/proc/PID/stat's, at most 15 characters)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = (proc / "stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait is work.
    values = [int(value) for value in fields[:8]]
    sample: Result = {"machine_s": (sum(values) - values[3] - values[4]) / ticks, "by_command": {}}
    for stat_path in proc.glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue  # gone since the listing
        command = text.split("(", 1)[1].rsplit(")", 1)[0]
        stat = parse_proc_stat(text)
        seconds = (stat.user_ticks + stat.system_ticks) / ticks
        sample["by_command"][command] = sample["by_command"].get(command, 0.0) + seconds
    return sample


def cpu_load(before: Result, after: Result, seconds: float, **own: float) -> Result:
    """Cores used between two samples: the whole machine, `own` (CPU seconds of processes the caller
    measured itself, such as the operator), and each command that used at least 0.01 cores, busiest
    first (processes that exited in between are not counted)."""
    cores: Result = {"machine": round((after["machine_s"] - before["machine_s"]) / seconds, 2),
                     "machine_cores": os.cpu_count()}  # fmt: skip
    for name, spent in own.items():
        cores[name] = round(spent / seconds, 2)
    used = {command: (spent - before["by_command"].get(command, 0.0)) / seconds
            for command, spent in after["by_command"].items()}  # fmt: skip
    for command, busy in sorted(used.items(), key=lambda item: -item[1]):
        if busy >= 0.01:
            cores[command] = round(busy, 2)
    return cores


def apiserver_metrics() -> Result:
    return apiserver_sample(kubectl("get", "--raw", "/metrics"))


def resource_versions(namespace: str) -> dict[str, str]:
    versions = {}
    kube = api_client()
    for kind in ("inferencemodels", "deployments", "services", "persistentvolumeclaims", "jobs"):
        for item in count_ready(namespace, kind, kube)[1]:
            versions[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return versions


# Report ------------------------------------------------------------------------------------


def machine() -> Result:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def markdown(results: Result) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['memory_gib']} GiB; Python {results['machine']['python']}. "
        f"Run took {results['total_seconds']:.0f} s.",
        "",
    ]
    if "overhead" in results:
        lines += [
            "| router overhead (cache off) | direct rps | router rps | ratio | direct p50/p99 ms | "
            "router p50/p99 ms | added p50/p99 ms | router CPU (cores) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["overhead"].items():
            label = f"{name[4:]} req/s, open loop" if name.startswith("rate") else f"concurrency {name[1:]}"
            cpu = entry["router_cpu_cores"]
            cpu_text = "-" if cpu is None else f"{cpu:.2f}"
            lines.append(
                f"| {label} | {entry['direct_rps']:.0f} | {entry['router_rps']:.0f} | "
                f"{entry['throughput_ratio']:.3f} | {entry['direct_p50_ms']:.2f} / {entry['direct_p99_ms']:.2f} | "
                f"{entry['router_p50_ms']:.2f} / {entry['router_p99_ms']:.2f} | "
                f"{entry['added_p50_ms']:.2f} / {entry['added_p99_ms']:.2f} | {cpu_text} |"
            )
        lines.append("")
    if "cache" in results:
        lines += [
            "| cache hits, 32 clients | rps | p50 ms | p99 ms | one client: p50 / mean ms |",
            "|---|---|---|---|---|",
        ]
        for name, entry in results["cache"].items():
            lines.append(
                f"| {name} | {entry['rps']:.0f} | {entry['p50_ms']:.2f} | {entry['p99_ms']:.2f} | "
                f"{entry['c1_p50_ms']:.2f} / {entry['c1_mean_ms']:.2f} |"
            )
        lines.append("")
    if "streams" in results:
        s = results["streams"]
        lines += [
            "| streaming scale | value |",
            "|---|---|",
            f"| concurrent streams | {s['streams']} |",
            f"| failed / completed through the router | {s['router_failed_streams']} / "
            f"{s['router_completed_streams']} |",
            f"| router peak RSS | {s['router_peak_rss_mb']} MB |",
            f"| TTFT direct / router p50 | {s['direct_ttft_p50_ms']:.1f} / {s['router_ttft_p50_ms']:.1f} ms |",
            f"| TTFT overhead p50 / p99 | {s['ttft_overhead_p50_ms']:.1f} / {s['ttft_overhead_p99_ms']:.1f} ms |",
            f"| chunk gap added p50 / p99 | {s['chunk_gap_added_p50_ms']:.2f} / {s['chunk_gap_added_p99_ms']:.2f} ms |",
            "",
        ]
    if "model" in results:
        m = results["model"]
        lines += [
            "| Gemma 3 270M on Ollama | tokens/s | TTFT ms |",
            "|---|---|---|",
            f"| direct | {m['direct']['tokens_per_s']} | {m['direct']['ttft_ms']} |",
            f"| through the router | {m['router']['tokens_per_s']} | {m['router']['ttft_ms']} |",
            f"| ratio / added | {m['tokens_per_s_ratio']} | {m['ttft_added_ms']} |",
            "",
        ]
    if "operator" in results:
        o = results["operator"]
        lines += [
            "| operator scale | value |",
            "|---|---|",
            f"| InferenceModels applied at once | {o['models']} |",
            f"| all Services, PVCs and prefetch Jobs exist | {o.get('children_s', 'not reached')} s |",
            *(
                f"| kube-apiserver until then: {label} | {o['apiserver_until_children'][key]} |"
                for key, label in APISERVER_LABELS.items()
                if "apiserver_until_children" in o
            ),
            *(
                f"| cores used until then: {name} | {cores} |"
                for name, cores in o.get("cpu_cores_until_children", {}).items()
            ),
            *(
                f"| operator until then: {verb} | {count:.0f} |"
                for verb, count in o.get("operator_requests_until_children", {}).items()
            ),
            f"| all Deployments exist (after the prefetch Jobs) | {o.get('deployments_s', 'not reached')} s |",
            f"| all Ready | {o.get('ready_s', 'not reached')} s ({o['ready_models']} ready) |",
            f"| no more event-driven reconciles (settled) | {o.get('settled_s') or 'not within 180 s'} s |",
            f"| operator peak RSS | {o['operator_peak_rss_mb']} MB |",
            f"| objects written in {o['steady_state_seconds']:.0f} s of steady state | {o['steady_state_writes']} |",
            *(
                f"| steady state: {verb} requests per minute | {rate} |"
                for verb, rate in o.get("steady_state_requests_per_min", {}).items()
            ),
            "",
        ]
    if "fairness" in results:
        f = results["fairness"]
        lines += [
            f"| light key, 1 request/s, while {f['flooders']} clients of another key flood one slot | "
            "answer p50 ms | answer p90 ms | queue wait p90 ms | p90 / unloaded | Jain's index |",
            "|---|---|---|---|---|---|",
            *(
                f"| {phase} | {f[phase]['light_latency_p50_ms']} | {f[phase]['light_latency_p90_ms']} | "
                f"{f[phase]['light_queue_wait_p90_ms']} | {f[phase].get('light_latency_p90_ratio', 1.0)} | "
                f"{f[phase].get('jain_index', '—')} |"
                for phase in ("unloaded", "fifo", "fair")
            ),
            "",
        ]
    if "prefix_affinity" in results:
        lines += [*affinity_rows(results["prefix_affinity"]), ""]
    if "prefix_affinity_vllm" in results:
        lines += [*affinity_rows(results["prefix_affinity_vllm"]), ""]
    if "peers_run" in results:
        lines += [*peers_rows(results["peers_run"]), ""]
    return "\n".join(lines)


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: every `running` block stops its process group on the way out."""

    def stop(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str]) -> int:

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument(
        "--only", default="overhead,cache,streams,model,operator,fairness,prefix_affinity,prefix_affinity_vllm,peers"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results.json")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    wanted = set(args.only.split(","))
    seconds, rounds = (2.0, 1) if args.quick else (8.0, 2)
    started = time.monotonic()
    build_go_tools()
    results: Result = {"machine": machine(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="modelfleet-bench-") as tmp:
        work = Path(tmp)
        # The support desk's users, the same on both engines.
        users: dict[str, Any] = {"rounds": 1 if args.quick else 2, "users": 4 if args.quick else 8,
                                 "turns": 3 if args.quick else 6, "think": (8.0, 16.0), "stagger": 2.0}  # fmt: skip
        sections: dict[str, Callable[[], Result]] = {
            "overhead": lambda: bench_overhead(work, seconds, rounds),
            "cache": lambda: bench_cache(work, seconds, rounds),
            "streams": lambda: bench_streams(work, 200 if args.quick else 1000, rounds),
            "model": lambda: bench_model(work, 2 if args.quick else 5, 64 if args.quick else 128),
            "operator": lambda: bench_operator(work, 20 if args.quick else 200, 10 if args.quick else 60),
            "fairness": lambda: bench_fairness(work, 8 if args.quick else 20),
            # Users read each answer for 8-16 s before the next question: engines kept busy without a
            # pause measure their queues more than their caches (docs/benchmarks.md has both runs).
            "prefix_affinity": lambda: bench_prefix_affinity(work, **users),
            # The same users on two vLLM CPU replicas (`make install-vllm`), one core each.
            "prefix_affinity_vllm": lambda: bench_prefix_affinity_vllm(work, **users),
            # Skips a peer whose venv is missing (`make install-bench-peers`), saying so in the table.
            "peers": lambda: bench_peers(work, args.quick),
        }
        for name, section in sections.items():
            if name in wanted:
                results[name] = section()
                if name == "peers":
                    # `peers` is the summary, one row per system; `peers_run` has everything measured.
                    results["peers_run"] = results.pop("peers")
                    results["peers"] = peers_summary(results["peers_run"])
                # Written after every section, so an interrupted run keeps what it measured.
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["total_seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
