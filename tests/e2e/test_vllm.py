"""vLLM for real: an InferenceModel of runtime vllm becomes a vLLM pod on the real node, serving on its CPU.

A model that asks for no GPU runs vLLM's CPU build (the vllm-cpu image, Dockerfile.vllm-cpu, built and
imported here). Its weights come from a Hugging Face endpoint, as behind a hub mirror, Artifactory or
Nexus: olah on the node's bridge (hack/hfmirror.sh), serving Gemma 3 270M converted from the packaged
GGUF (hack/vllm_model.py). Downloads are counted in the mirror's log, so "fetched once" is
measured. The router, installed by the chart on the same node, finds the pod through its EndpointSlice,
and the `openai` SDK talks to it.

The tests run in file order on one release and one model, each starting from what the one before left.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR
from tests.support.managed import (
    GROUP,
    PLURAL,
    START,
    VERSION,
    chat_loop,
    condition,
    get_model,
    openai_client,
    patch_spec,
    prefetch_jobs,
    ready,
    serving_pods,
    wait_ready,
)
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    NETWORK,
    REPO,
    Release,
    RequestLoop,
    api_key,
    installed_release,
    node_port_url,
    run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(1800)]

HUB = f"http://{BRIDGE_ADDRESS}:{NETWORK['hf_mirror_port']}"
HUB_MODEL = NETWORK["hf_mirror_model"]  # modelfleet/gemma-3-270m
# olah's log, with uvicorn's line for each request.
ACCESS_LOG = REPO / ".cache" / "hfmirror" / "hfmirror.log"
NAME = "gemma-vllm"
REPORT: dict[str, Any] = {}
# What the closing summary prints, kept for the notes: phase timings, memory, scaling.
REPORT_FILE = REPO / ".cache" / "vllm" / "report.json"
PROMETHEUS = f"http://127.0.0.1:{NETWORK['prometheus_port']}"
# Bounds, not goals: a vLLM replica starts in 1-2 minutes on two shared cores.
SCALE = 900


@pytest.fixture(scope="module")
def vllm_image(real_node: client.V1Node) -> str:
    """The vLLM CPU image, built (cached by its inputs) and imported into the node once per build."""
    run([str(REPO / "hack" / "images.sh"), "vllm"], "hack/images.sh vllm", timeout=3600)
    out = REPO / ".cache" / "images" / "vllm-cpu"
    name = next(
        line.split(":", 1)[1].strip()
        for line in (REPO / "charts" / "modelfleet" / "values.yaml").read_text().splitlines()
        if line.strip().startswith("vllmCpuImage:")
    )
    started = time.monotonic()
    run(
        [
            str(REPO / "hack" / "node.sh"),
            "import-once",
            str(out / "image.tar"),
            name,
            (out / "image.key").read_text().strip(),
        ],
        "importing the vLLM CPU image",
        timeout=1200,
    )
    REPORT["image import (s)"] = round(time.monotonic() - started, 1)
    REPORT["image archive (MB)"] = round((out / "image.tar").resolve().stat().st_size / 1e6)
    return name


@pytest.fixture(scope="module")
def hub(real_node: client.V1Node) -> str:
    run([str(REPO / "hack" / "hfmirror.sh"), "start"], "hack/hfmirror.sh start", timeout=1800)
    return HUB


@pytest.fixture(scope="module")
def stack(
    cluster: Cluster, node_images: list[str], inferencemodel_crd: str, vllm_image: str, hub: str
) -> Iterator[Release]:
    namespace = namespace_name_for("vllm")
    yield from installed_release(
        cluster, BIN_DIR / "helm", namespace, extra_args=("--set", f"router.discoveryNamespace={namespace}")
    )
    print("\n".join(f"{key}: {value}" for key, value in REPORT.items()))
    REPORT_FILE.parent.mkdir(parents=True, exist_ok=True)
    REPORT_FILE.write_text(json.dumps(REPORT, indent=1, default=str))


def vllm_model(name: str, model: str = HUB_MODEL, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runtime": "vllm",
        "model": model,
        "source": {"huggingFaceEndpoint": HUB},
        # No GPU: the operator gives the pod the vLLM CPU image.
        # The memory limit bounds page cache too, and vLLM counts the cgroup's cached pages (the image's
        # libraries, the weights) as used when it sizes its KV cache: 6Gi left it none.
        "resources": {"gpu": 0, "cpu": "500m", "memory": "10Gi"},
        "scheduling": {
            "nodeSelector": {"modelfleet.io/real-node": "true"},
            "tolerations": [{"key": "modelfleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "cache": {"size": "2Gi", "storageClassName": "local-path"},
        "engine": {
            # float32: these cores have no bfloat16 arithmetic. Eager: half the start time of a compiled
            # graph. Tool calls in Hermes's format (<tool_call>...</tool_call>). vLLM forces a required or
            # named tool call through a grammar, but holds its arguments to the tool's schema only for a
            # strict tool, unless --tool-strict-level says every tool is; and a JSON grammar that allows
            # any whitespace lets a small base model emit newlines until max_tokens.
            "args": [
                "--dtype",
                "float32",
                "--max-model-len",
                "2048",
                "--enforce-eager",
                "--enable-auto-tool-choice",
                "--tool-call-parser",
                "hermes",
                "--tool-strict-level",
                "parameter",
                "--structured-outputs-config",
                '{"backend": "xgrammar", "disable_any_whitespace": true}',
                # One sequence at a time while the router admits four: the others wait in vLLM's
                # own queue, which is what autoscaling.metric=engine reads.
                "--max-num-seqs",
                "1",
            ],
        },
        "serving": {"maxInFlightPerReplica": 4},
    }
    spec.update(overrides)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel", "metadata": {"name": name}, "spec": spec}


def weight_downloads() -> int:
    """GETs of the weights file that the mirror answered with 200, since it started."""
    if not ACCESS_LOG.exists():
        return 0
    pattern = re.compile(rf'"GET /{re.escape(HUB_MODEL)}/resolve/[^/ ]+/model\.safetensors HTTP/1\.1" 200')
    return sum(1 for line in ACCESS_LOG.read_text(errors="replace").splitlines() if pattern.search(line))


def engine_log(stack: Release, pod: str) -> str:
    return stack.cluster.kubectl("-n", stack.namespace, "logs", pod).stdout


def test_a_vllm_model_is_downloaded_from_the_hub_served_on_cpu_and_streams_through_the_router(stack: Release) -> None:
    before = weight_downloads()
    started = time.monotonic()
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, vllm_model(NAME)
    )
    with contextlib.closing(chat_loop(stack, model=NAME).start()) as early_client:
        wait_ready(stack, NAME, timeout=START)
        REPORT["apply to Ready (s)"] = round(time.monotonic() - started, 1)
        wait_for(lambda: early_client.answered >= 1, "the early client's first answer", timeout=START)
    model = get_model(stack, NAME)
    REPORT["status.timings"] = model["status"].get("timings")
    assert condition(model, "ModelCached")["reason"] == "Prefetched", model["status"]

    (job,) = prefetch_jobs(stack, NAME)
    assert job.status.succeeded == 1, job.status
    assert weight_downloads() - before == 1, ACCESS_LOG.read_text()[-2000:]

    (pod,) = serving_pods(stack, NAME)
    (container,) = pod.spec.containers
    assert container.image == "ghcr.io/modelfleet/vllm-cpu:0.32.0", container.image
    env = {var.name: var.value for var in container.env}
    assert (env["HF_HUB_OFFLINE"], env["VLLM_CPU_KVCACHE_SPACE"]) == ("1", "1"), env
    REPORT["memory of the serving container (MiB)"] = container_memory_mib(stack, pod.metadata.name)

    # A stream through the router, with the official SDK, served by this very engine: vLLM logs it.
    stream = openai_client(stack).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    usage = next(chunk.usage for chunk in chunks if chunk.usage is not None)
    assert text.strip(), chunks[-3:]
    assert usage.completion_tokens > 0, usage
    log = engine_log(stack, pod.metadata.name)
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in log, log[-3000:]

    # The routers read the engine's own load (its /metrics) for their replica choice, as the admin API shows.
    def engine_reading() -> dict[str, Any] | None:
        answer = httpx.get(f"{node_port_url(stack)}/v1/admin/models/{NAME}", timeout=10,
                           headers={"Authorization": f"Bearer {api_key(stack, 'admin-key')}"})  # fmt: skip
        (endpoint,) = answer.json()["endpoints"]
        reading: dict[str, Any] | None = endpoint["engine"]
        return reading

    wait_for(lambda: engine_reading() is not None, "a router's reading of vLLM's /metrics", timeout=60)
    reading = engine_reading()
    assert reading is not None
    assert 0.0 <= reading["kv_cache_usage"] <= 1.0, reading
    # The first generation the engine served was the operator's warm-up (a completion), before any chat.
    first = re.search(r'"POST /v1/(chat/completions|completions) HTTP/1.1" 200', log)
    assert first is not None, log[-3000:]
    assert first.group(1) == "completions", log[-3000:]


def test_a_restarted_replica_reads_the_volume_and_downloads_nothing(stack: Release) -> None:
    before = weight_downloads()
    (old,) = serving_pods(stack, NAME)
    client.CoreV1Api(stack.cluster.api).delete_namespaced_pod(old.metadata.name, stack.namespace)
    wait_for(
        lambda: [p.metadata.name for p in serving_pods(stack, NAME)] not in ([], [old.metadata.name]),
        "a new serving pod",
        timeout=120,
    )
    started = time.monotonic()
    wait_ready(stack, NAME, timeout=START)
    REPORT["restart to Ready (s)"] = round(time.monotonic() - started, 1)
    assert weight_downloads() == before, ACCESS_LOG.read_text()[-2000:]
    assert len(prefetch_jobs(stack, NAME)) == 1
    answer = openai_client(stack).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert answer.choices[0].message.content, answer


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_tool_call_comes_back_through_the_router_with_arguments_that_match_the_schema(
    stack: Release, choice: str, stream: bool
) -> None:
    """The base model cannot call tools of itself; vLLM's grammar makes it, and the router must carry the
    call (and its streamed fragments) to the `openai` SDK unchanged."""
    tool_choice: Any = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    chat = openai_client(stack).chat.completions
    request: Any = {
        "model": NAME,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 120,
    }
    if stream:
        names, arguments, finish = [], {}, None
        for chunk in chat.create(**request, stream=True):
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                if delta.function and delta.function.arguments:
                    arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        calls = list(zip(names, [arguments[index] for index in sorted(arguments)], strict=True))
    else:
        answer = chat.create(**request)
        message = answer.choices[0].message
        finish = answer.choices[0].finish_reason
        calls = [(call.function.name, call.function.arguments) for call in message.tool_calls or []]
    assert calls, f"no tool call came back (finish_reason {finish})"
    for name, raw in calls:
        assert name == "get_weather", calls
        jsonschema.validate(json.loads(raw), WEATHER_TOOL["function"]["parameters"])
    # OpenAI's own: "tool_calls" when the model chose to call, "stop" for a function the caller named.
    assert finish == ("tool_calls" if choice == "required" else "stop"), finish


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_json_schema_answer_is_honoured_through_the_router(stack: Release, stream: bool) -> None:
    chat = openai_client(stack).chat.completions
    request: Any = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Describe a person."}],
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
    }
    if stream:
        text = "".join(
            chunk.choices[0].delta.content or "" for chunk in chat.create(**request, stream=True) if chunk.choices
        )
    else:
        text = chat.create(**request).choices[0].message.content or ""
    jsonschema.validate(json.loads(text), PERSON)


def prometheus_value(query: str) -> float | None:
    url = f"{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def deployment(stack: Release) -> Any:
    return client.AppsV1Api(stack.cluster.api).read_namespaced_deployment(f"im-{NAME}", stack.namespace)


def hpa_condition(stack: Release, kind: str) -> Any:
    hpa = client.AutoscalingV2Api(stack.cluster.api).read_namespaced_horizontal_pod_autoscaler(
        f"im-{NAME}", stack.namespace
    )
    return next((c for c in hpa.status.conditions or [] if c.type == kind), None)


def long_stream_loop(stack: Release, worker: int) -> RequestLoop:
    """Streams of 48 tokens, one after another: at one sequence per replica, four of these keep vLLM's
    queue of waiting requests above the HPA's target."""
    chat = openai_client(stack)
    turns = itertools.count()

    def one_stream() -> str | None:
        stream = chat.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"Tell story {worker}.{next(turns)}."}],
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        return None if usage and usage[0].completion_tokens > 0 else f"a stream ended without usage: {usage}"

    return RequestLoop(one_stream)


def stop_all(loops: list[RequestLoop]) -> None:
    """Every loop told to stop before any is waited for: closing them one by one would let the others
    go on sending while the first finishes its stream."""
    for loop in loops:
        loop.stop.set()
    for loop in loops:
        loop.close()


@pytest.mark.autoscaling
def test_vllms_own_queue_scales_the_model_from_one_to_two_replicas_and_back(stack: Release) -> None:
    """autoscaling.metric=engine, for real: Prometheus scrapes vLLM's vllm:num_requests_waiting, the
    adapter serves it as the Pods metric vllm_num_requests_waiting, and the HPA scales on it."""
    run([str(REPO / "hack" / "monitoring.sh"), "status"], "hack/monitoring.sh status")
    waiting = f'sum(vllm:num_requests_waiting{{namespace="{stack.namespace}"}})'
    wait_for(lambda: prometheus_value(waiting) == 0, "Prometheus to scrape vLLM's idle queue", timeout=120)
    before = weight_downloads()
    patch_spec(
        stack,
        NAME,
        {
            "autoscaling": {
                "enabled": True,
                "metric": "engine",
                "minReplicas": 1,
                "maxReplicas": 2,
                "targetQueueDepthPerReplica": 1,
                # Held while the second replica starts without load (see below); lowered for the way down.
                "scaleDownStabilizationSeconds": 900,
            }
        },
    )
    wait_for(
        lambda: getattr(hpa_condition(stack, "ScalingActive"), "status", None) == "True",
        "the HPA to read vLLM's queue",
        timeout=300,
    )
    assert deployment(stack).spec.replicas == 1
    loops = [long_stream_loop(stack, worker).start() for worker in range(4)]
    started = time.monotonic()
    try:
        wait_for(lambda: (prometheus_value(waiting) or 0) >= 2, "requests waiting in vLLM's queue", timeout=300)
        queued = time.monotonic()
        wait_for(lambda: (deployment(stack).spec.replicas or 0) >= 2, "the HPA to ask for a second replica", SCALE)
        REPORT["engine queue to the HPA's decision (s)"] = round(time.monotonic() - queued, 1)
    finally:
        stop_all(loops)
    REPORT["load (s)"] = round(time.monotonic() - started, 1)
    # The load stops once the HPA has decided: on two shared cores a second vLLM starting beside a busy
    # one is starved for more than ten minutes (on a GPU fleet each replica has its own device).
    decided = time.monotonic()
    wait_for(lambda: (deployment(stack).status.ready_replicas or 0) >= 2, "a second Ready replica", SCALE)
    REPORT["HPA decision to a second Ready replica (s)"] = round(time.monotonic() - decided, 1)
    # Both replicas serve: the router spreads the streams, and each engine's log shows chats.
    spread = [long_stream_loop(stack, worker).start() for worker in range(4)]
    try:
        wait_for(
            lambda: all(
                '"POST /v1/chat/completions HTTP/1.1" 200' in engine_log(stack, pod.metadata.name)
                for pod in serving_pods(stack, NAME)
            ),
            "chats on both replicas",
            timeout=300,
        )
    finally:
        stop_all(spread)
    failures = [failure for loop in loops + spread for failure in loop.failures]
    assert not failures, failures[:5]
    assert sum(loop.answered for loop in loops) > 0
    assert sum(loop.answered for loop in spread) > 0
    # The second replica loaded the weights from the volume.
    assert weight_downloads() == before
    REPORT["memory per replica (MiB)"] = [
        container_memory_mib(stack, pod.metadata.name) for pod in serving_pods(stack, NAME)
    ]
    patch_spec(stack, NAME, {"autoscaling": {"scaleDownStabilizationSeconds": 30}})
    started = time.monotonic()
    wait_for(
        lambda: deployment(stack).spec.replicas == 1 and len(serving_pods(stack, NAME)) == 1,
        "the model back at 1 replica",
        SCALE,
    )
    REPORT["idle to 1 replica (s)"] = round(time.monotonic() - started, 1)
    patch_spec(stack, NAME, {"autoscaling": None})
    wait_ready(stack, NAME, timeout=START)


ADAPTER = "gemma-vllm-lora"
ADAPTER_REPO = "modelfleet/gemma-3-270m-lora-random"


def test_a_lora_adapter_answers_under_its_own_name_through_the_router(stack: Release) -> None:
    """spec.adapters: the prefetch Job adds the adapter's repository to the volume (the model's files are
    not fetched again), the new pods load it, and the router sends its name to the engine."""
    before = weight_downloads()
    (old_job,) = prefetch_jobs(stack, NAME)
    patch_spec(stack, NAME, {"adapters": [{"name": ADAPTER, "model": ADAPTER_REPO}]})
    wait_for(lambda: {job.metadata.name for job in prefetch_jobs(stack, NAME)} - {old_job.metadata.name},
             "a prefetch Job for the adapter", timeout=120)  # fmt: skip
    wait_for(lambda: all(ADAPTER in " ".join(pod.spec.containers[0].args) for pod in serving_pods(stack, NAME))
             and ready(stack, NAME), "the model Ready on pods that load the adapter", timeout=START)  # fmt: skip
    assert weight_downloads() == before, "the model's weights were fetched again"
    served = {card.id: card for card in openai_client(stack).models.list().data}
    assert ADAPTER in served, sorted(served)
    assert getattr(served[ADAPTER], "parent", None) == NAME

    def greedy(model: str) -> tuple[str, str]:
        answer = openai_client(stack).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count: 1, 2, 3,"}], max_tokens=12, temperature=0,
            extra_body={"use_cache": False},
        )  # fmt: skip
        return answer.model, answer.choices[0].message.content or ""

    (adapter_model, adapted), (base_model, plain) = greedy(ADAPTER), greedy(NAME)
    # vLLM names the model it ran in its answer: the adapter for one, the base for the other.
    assert (adapter_model, base_model) == (ADAPTER, NAME), (adapter_model, base_model)
    assert adapted, adapted
    assert adapted != plain, "the adapter's random weights change a greedy answer"
    REPORT["greedy answers, base / adapter"] = [plain, adapted]


def test_a_missing_repository_fails_the_download_with_a_clear_status(stack: Release) -> None:
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, vllm_model("no-such-model", model="modelfleet/no-such-model")
    )

    def failed() -> dict[str, Any] | None:
        cached = condition(get_model(stack, "no-such-model"), "ModelCached")
        return cached if cached.get("status") == "False" and "has no model" in cached.get("message", "") else None

    wait_for(failed, "ModelCached False saying the hub has no such model", timeout=300)
    message = condition(get_model(stack, "no-such-model"), "ModelCached")["message"]
    assert f"{HUB} has no model modelfleet/no-such-model" in message, message
    assert "spec.source.huggingFaceEndpoint" in message, message
    # Failed at once: no retry can make the repository appear.
    (job,) = prefetch_jobs(stack, "no-such-model")
    assert (job.status.failed or 0) == 1, job.status
    client.CustomObjectsApi(stack.cluster.api).delete_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, "no-such-model"
    )


def container_memory_mib(stack: Release, pod: str) -> float | None:
    """The serving container's memory, from the kubelet's summary (working set)."""
    raw = stack.cluster.kubectl(
        "get", "--raw", f"/api/v1/nodes/{NETWORK['node_name']}/proxy/stats/summary", check=False
    ).stdout
    if not raw:
        return None
    for entry in json.loads(raw).get("pods", []):
        if entry["podRef"]["name"] == pod:
            for container in entry.get("containers", []):
                working_set = (container.get("memory") or {}).get("workingSetBytes")
                if working_set:
                    return round(working_set / 2**20)
    return None
