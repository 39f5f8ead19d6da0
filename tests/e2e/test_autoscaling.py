"""Queue-depth autoscaling for real: the router's queue, through Prometheus and prometheus-adapter, to the HPA.

The local cluster runs the pipeline a cluster would (hack/monitoring.sh): Prometheus scrapes the two
router pods of the chart, prometheus-adapter serves their summed modelfleet_queue_depth as the
External metric of external.metrics.k8s.io, and the real HPA controller of Kubernetes 1.37 scales the
model's Deployment, down to zero when minReplicas is 0. The model pods are real Ollama containers on
the real node, which load the model from their volume and warm up before they get traffic.

The tests run in file order on one release and one model, as a user's cluster would: two routers
sharing one cap, then 1 -> 2 -> 1 under a bounded load (with the metric taken away for a while),
then 0 -> 1 -> 0. A sampler records the timeline (queue depth, the HPA's desired replicas, the
Deployment's ready replicas, request latencies) into .cache/autoscaling/timeline.json;
hack/plot_autoscaling.py draws it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR
from tests.support.managed import (
    GROUP,
    PLURAL,
    VERSION,
    RegistryModel,
    assert_warmed_up_before_any_routed_request,
    blob_bytes,
    chat_loop,
    downloaded_since,
    get_model,
    managed_model,
    openai_client,
    patch_spec,
    serving_pods,
    wait_ready,
)
from tests.support.realnode import NETWORK, REPO, Release, api_key, installed_release, run

pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.autoscaling, pytest.mark.timeout(1800)]

PROMETHEUS = f"http://127.0.0.1:{NETWORK['prometheus_port']}"
MONITORING = REPO / "hack" / "monitoring.sh"
TIMELINE = REPO / ".cache" / "autoscaling" / "timeline.json"
NAME = "gemma"
# gemma3:270m's weights generating on one thread: ggml busy-waits, and three replicas with a thread
# per core would measure the machine's contention, not the autoscaling.
ONE_THREAD_MODEL = "gemma3-1thread:270m"
DEPLOYMENT = f"im-{NAME}"
SLOTS_PER_REPLICA = 2
# Bounds, not goals: starting pods, scraping, and the HPA's 15 s look on two shared cores.
SCALE_UP = 600
SCALE_DOWN = 600

# What the closing note quotes.
REPORT: dict[str, Any] = {}


# The stack and the model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(cluster: Cluster, node_images: list[str], inferencemodel_crd: str) -> Iterator[Release]:
    """The chart with its two router replicas, and no request rate limit (the load is ours and bounded)."""
    namespace = namespace_name_for("autoscaling")
    yield from installed_release(
        cluster,
        BIN_DIR / "helm",
        namespace,
        extra_args=(
            "--set", f"router.discoveryNamespace={namespace}",
            "--set", "router.replicas=2",
            "--set", "router.rateLimit.requestsPerMinute=0",
        ),
    )  # fmt: skip
    print("\n".join(f"{key}: {value}" for key, value in REPORT.items()))


@pytest.fixture(scope="module")
def one_thread_model(registry_model: RegistryModel) -> str:
    run([str(REPO / "hack" / "registry.sh"), "push-variant", ONE_THREAD_MODEL, "PARAMETER num_thread 1"],
        "hack/registry.sh push-variant", timeout=600)  # fmt: skip
    return ONE_THREAD_MODEL


@pytest.fixture(scope="module")
def monitoring(real_node: client.V1Node) -> None:
    """The metrics pipeline is up (hack/cluster.sh up starts it)."""
    run([str(MONITORING), "status"], "hack/monitoring.sh status")


@pytest.fixture(scope="module")
def timeline(stack: Release, monitoring: None) -> Iterator[Timeline]:
    recorder = Timeline(stack)
    recorder.start()
    yield recorder
    recorder.stop()
    TIMELINE.parent.mkdir(parents=True, exist_ok=True)
    TIMELINE.write_text(json.dumps(recorder.as_json(REPORT), indent=1))
    print(f"timeline: {TIMELINE} ({len(recorder.samples)} samples, {len(recorder.requests)} requests)")


# Reading the pipeline ---------------------------------------------------------------------------


def prometheus_value(query: str) -> float | None:
    url = f"{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def external_queue_depth(stack: Release) -> float | None:
    """What the HPA controller reads: the adapter's modelfleet_queue_depth for this model, or None."""
    selector = urllib.parse.quote(f"model={NAME},namespace={stack.namespace}")
    path = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{stack.namespace}/modelfleet_queue_depth"
    result = stack.cluster.kubectl("get", "--raw", f"{path}?labelSelector={selector}", check=False)
    if result.returncode != 0:
        return None
    items = json.loads(result.stdout)["items"]
    return sum(quantity(item["value"]) for item in items) if items else None


def quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def router_metrics(pod_ip: str) -> dict[str, float]:
    """This router replica's own gauges for the model, read from its /metrics."""
    with urllib.request.urlopen(f"http://{pod_ip}:8000/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {
        "modelfleet_queue_depth": "queue",
        "modelfleet_in_flight_requests": "in_flight",
        "modelfleet_admission_slots": "slots",
        "modelfleet_ready_replicas": "ready",
    }
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted and f'model="{NAME}"' in rest:
            found[wanted[name]] = float(line.rsplit(" ", 1)[1])
    return found


def hpa(stack: Release) -> Any:
    return client.AutoscalingV2Api(stack.cluster.api).read_namespaced_horizontal_pod_autoscaler(
        DEPLOYMENT, stack.namespace
    )


def hpa_condition(stack: Release, kind: str) -> Any:
    return next((c for c in hpa(stack).status.conditions or [] if c.type == kind), None)


def deployment(stack: Release) -> Any:
    return client.AppsV1Api(stack.cluster.api).read_namespaced_deployment(DEPLOYMENT, stack.namespace)


def failed_metric_reads(stack: Release) -> int:
    """How many times the HPA controller has failed to get the metric: one event per look, the repeats
    counted into the same Event object."""
    events = client.CoreV1Api(stack.cluster.api).list_namespaced_event(
        stack.namespace,
        field_selector=f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={DEPLOYMENT},"
        "reason=FailedGetExternalMetric",
    )
    return sum(event.count or 1 for event in events.items)


def router_urls(stack: Release) -> list[str]:
    pods = [pod for pod in stack.pods("router") if pod.status.pod_ip and pod.metadata.deletion_timestamp is None]
    assert len(pods) == 2, [pod.metadata.name for pod in pods]
    return [f"http://{pod.status.pod_ip}:8000" for pod in sorted(pods, key=lambda p: p.status.pod_ip)]


# Load and timeline ------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    router: str
    started: float
    first_token: float | None = None
    ended: float | None = None
    error: str | None = None
    heartbeats: int = 0


def stream_chat(url: str, key: str, prompt: str, record: RequestRecord, timeout: float = 600) -> None:
    """One streamed chat completion over raw SSE, so that the router's `: ping` heartbeats are seen."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "stream": True}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(timeout, connect=10),
        ) as response:  # fmt: skip
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                return
            for line in response.iter_lines():
                if line.startswith(":"):
                    record.heartbeats += 1
                elif line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        record.error = json.dumps(event["error"])[:300]
                    elif record.first_token is None and any(
                        (choice.get("delta") or {}).get("content") for choice in event.get("choices") or []
                    ):
                        record.first_token = time.monotonic()
            if record.first_token is None and record.error is None:
                record.error = "the stream ended without a token"
    except httpx.HTTPError as exc:
        record.error = repr(exc)
    finally:
        record.ended = time.monotonic()


@dataclass
class Load:
    """`workers` clients, each streaming chats one after another to its router until stopped or out of time."""

    stack: Release
    urls: list[str]
    workers: int
    max_seconds: float
    records: list[RequestRecord]
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, index: int) -> None:
        key = api_key(self.stack)
        url = self.urls[index % len(self.urls)]
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            record = RequestRecord(router=url, started=time.monotonic())
            self.records.append(record)
            # A new prompt every time: a cached answer would never reach the queue.
            stream_chat(url, key, f"Worker {index}, request {sent}: name a colour.", record)
            sent += 1

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(self.workers)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=660)


class Timeline:
    """Samples the pipeline about once a second, from the test's start to its end."""

    def __init__(self, stack: Release) -> None:
        self.stack = stack
        self.origin = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.requests: list[RequestRecord] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sample()  # the end state, which the last look may have missed

    def mark(self, label: str) -> float:
        now = time.monotonic()
        self.marks.append((now - self.origin, label))
        return now

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        namespace = self.stack.namespace
        sample: dict[str, Any] = {"t": round(time.monotonic() - self.origin, 2)}
        try:
            sample["queue"] = prometheus_value(f'sum(modelfleet_queue_depth{{model="{NAME}",namespace="{namespace}"}})')
            sample["in_flight"] = prometheus_value(f'sum(modelfleet_in_flight_requests{{model="{NAME}"}})')
            current = deployment(self.stack)
            sample["replicas"] = current.spec.replicas
            sample["ready"] = current.status.ready_replicas or 0
            sample["desired"] = hpa(self.stack).status.desired_replicas
        except Exception as exc:  # the sampler records; the tests assert
            sample["error"] = repr(exc)[:200]
        self.samples.append(sample)

    def first(self, predicate: Any, after: float) -> float | None:
        """The monotonic time of the first sample after `after` that satisfies `predicate`."""
        for sample in self.samples:
            moment = self.origin + sample["t"]
            if moment >= after and "error" not in sample and predicate(sample):
                return moment
        return None

    def as_json(self, report: dict[str, Any]) -> dict[str, Any]:
        def relative(value: float | None) -> float | None:
            return None if value is None else round(value - self.origin, 2)

        return {
            "samples": self.samples,
            "marks": self.marks,
            "requests": [
                {
                    **asdict(r),
                    "started": relative(r.started),
                    "first_token": relative(r.first_token),
                    "ended": relative(r.ended),
                }
                for r in self.requests
            ],
            "report": report,
        }


def failures(records: list[RequestRecord]) -> list[str]:
    """Requests that failed, and requests still running: a stream whose thread outlived its join has no
    answer yet (the router's heartbeats keep its read timeout from firing), so it must not count as one."""
    return [f"{r.router}: {r.error if r.ended is not None else 'still running'}" for r in records
            if r.error is not None or r.ended is None]  # fmt: skip


def set_autoscaling(stack: Release, **autoscaling: Any) -> None:
    patch_spec(stack, NAME, {"autoscaling": {"enabled": True, **autoscaling}})


def replicas_are(stack: Release, wanted: int) -> bool:
    current = deployment(stack)
    pods = serving_pods(stack, NAME)
    return current.spec.replicas == wanted and (current.status.ready_replicas or 0) == wanted and len(pods) == wanted


# The tests --------------------------------------------------------------------------------------


def test_two_routers_share_the_cap_and_their_queues_add_up(
    stack: Release, one_thread_model: str, timeline: Timeline
) -> None:
    # One replica, two slots. Without sharing, each router would admit two: the backend would see four.
    spec = managed_model(NAME, one_thread_model, serving={"maxInFlightPerReplica": SLOTS_PER_REPLICA})
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, spec
    )
    wait_ready(stack, NAME)
    urls = router_urls(stack)
    ips = [url.removeprefix("http://").removesuffix(":8000") for url in urls]
    wait_for(lambda: all(router_metrics(ip).get("slots") == 1 for ip in ips), "each router to admit its share: 1 slot")
    timeline.mark("two routers: load")
    with Load(stack, urls, workers=6, max_seconds=300, records=timeline.requests) as load:
        # Three requests at each router: one runs, two wait.
        wait_for(
            lambda: all(router_metrics(ip).get("queue", 0) >= 2 for ip in ips),
            "both routers to queue requests",
            timeout=120,
        )
        per_router = {ip: router_metrics(ip) for ip in ips}
        assert all(m["in_flight"] == 1 and m["slots"] == 1 for m in per_router.values()), per_router
        # The HPA reads the sum of both routers' queues, through Prometheus and the adapter.
        wait_for(
            lambda: external_queue_depth(stack) == sum(router_metrics(ip)["queue"] for ip in ips) >= 4,
            "the external metric to equal the sum of the routers' queues",
            timeout=120,
        )
        REPORT["queue per router under 6 clients"] = {ip: router_metrics(ip)["queue"] for ip in ips}
    assert not failures(load.records), failures(load.records)
    assert sum(1 for r in load.records if r.error is None and r.first_token is not None) >= 6


def test_queue_depth_scales_up_and_a_missing_metric_holds_the_replicas(
    stack: Release, registry_model: RegistryModel, timeline: Timeline
) -> None:
    # The HPA's first look must see the idle queue, not the last scrape of the test before.
    wait_for(lambda: external_queue_depth(stack) == 0, "the external metric to show an empty queue", 120)
    set_autoscaling(stack, minReplicas=1, maxReplicas=3, targetQueueDepthPerReplica=1,
                    scaleDownStabilizationSeconds=60)  # fmt: skip
    wait_for(
        lambda: getattr(hpa_condition(stack, "ScalingActive"), "status", None) == "True",
        "the HPA to read the metric",
        timeout=180,
    )
    assert deployment(stack).spec.replicas == 1
    before = blob_bytes()
    urls = router_urls(stack)
    load_started = timeline.mark("scale up: load of 4 clients")
    with Load(stack, urls, workers=4, max_seconds=SCALE_UP, records=timeline.requests) as load:
        wait_for(lambda: (deployment(stack).status.ready_replicas or 0) >= 2, "a second Ready replica", SCALE_UP)
        second_ready = timeline.mark("second replica Ready")
        # The capacity grew with it: the queue drains.
        wait_for(
            lambda: prometheus_value(f'sum(modelfleet_queue_depth{{model="{NAME}"}})') == 0,
            "the queue to drain",
            timeout=300,
        )
        timeline.mark("queue drained")
        # Take the metric away while the HPA still wants the replicas the load needed.
        run([str(MONITORING), "stop", "adapter"], "stopping prometheus-adapter")
        timeline.mark("prometheus-adapter stopped")
        held = deployment(stack).spec.replicas
        # The hold below means something only if the load's replicas are still there to be held.
        assert (held or 0) >= 2, held
    load_ended = timeline.mark("load stopped")
    try:
        assert not failures(load.records), failures(load.records)
        queue_built = timeline.first(lambda s: (s.get("queue") or 0) > 0, after=load_started)
        assert queue_built is not None
        REPORT["queue build-up to a new Ready replica (s)"] = round(second_ready - queue_built, 1)
        scaled = timeline.first(lambda s: (s.get("replicas") or 0) >= 2, after=queue_built)
        if scaled is not None:
            REPORT["scale up: queue build-up to the HPA's decision (s)"] = round(scaled - queue_built, 1)
        # New replicas loaded the model from the volume: nothing was downloaded.
        assert sum(downloaded_since(before).values()) == 0, downloaded_since(before)
        # And they warmed up before any request of the router reached them.
        routed = [assert_warmed_up_before_any_routed_request(stack, pod) for pod in serving_pods(stack, NAME)]
        assert sum(routed) >= 1, routed

        # No metric: idle now, the HPA would scale down after 60 s, but it cannot read the queue, so it
        # holds. Six failed looks (15 s apart) span the 60 s stabilization window and more. (Not many
        # more: the controller's event recorder drops an object's events beyond a burst of 25.)
        failed_before = failed_metric_reads(stack)
        wait_for(lambda: failed_metric_reads(stack) >= failed_before + 6, "6 failed reads of the metric", 300)
        condition = hpa_condition(stack, "ScalingActive")
        assert (condition.status, condition.reason) == ("False", "FailedGetExternalMetric"), condition
        assert deployment(stack).spec.replicas == held
        REPORT["replicas held while the metric was missing"] = held
        REPORT["held for (s)"] = round(time.monotonic() - load_ended, 1)
    finally:
        run([str(MONITORING), "start", "adapter"], "starting prometheus-adapter")
    metric_back = timeline.mark("prometheus-adapter started")

    # The metric is back; the idle model returns to one replica, and light traffic never fails meanwhile.
    with chat_loop(stack) as chats:
        wait_for(lambda: replicas_are(stack, 1), "the model back at 1 replica", SCALE_DOWN)
    back = timeline.mark("back at 1 replica")
    assert not chats.failures, chats.failures
    assert chats.answered > 0
    REPORT["metric back to 1 replica (s)"] = round(back - metric_back, 1)


def test_an_idle_model_scales_to_zero_and_a_burst_brings_it_back(
    stack: Release, registry_model: RegistryModel, timeline: Timeline
) -> None:
    # A target of 8 waiting requests per replica: the burst below (5) asks for exactly one.
    set_autoscaling(stack, minReplicas=0, maxReplicas=3, targetQueueDepthPerReplica=8,
                    scaleDownStabilizationSeconds=30)  # fmt: skip
    wait_for(lambda: replicas_are(stack, 0), "the idle model at zero replicas", SCALE_DOWN)
    timeline.mark("zero replicas")
    wait_for(lambda: (get_model(stack, NAME).get("status") or {}).get("phase") == "Idle", "phase Idle")
    assert getattr(hpa_condition(stack, "ScaledToZero"), "status", None) == "True", hpa(stack).status.conditions

    # A burst at zero: every request waits in the router; the streams get heartbeats meanwhile, and
    # the OpenAI SDK's plain call just waits too.
    key = api_key(stack)
    urls = router_urls(stack)
    records = [RequestRecord(router=url, started=time.monotonic()) for url in (*urls, *urls)]
    timeline.requests.extend(records)
    sdk_answers: list[str] = []
    burst = timeline.mark("burst of 4 streams and 1 SDK call at zero replicas")

    def sdk_chat() -> None:
        answer = (
            openai_client(stack)
            .with_options(timeout=600)
            .chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
        )
        sdk_answers.append(answer.choices[0].message.content or "")

    threads = [
        threading.Thread(target=stream_chat, args=(record.router, key, f"Burst {i}: say hello.", record))
        for i, record in enumerate(records)
    ]
    threads.append(threading.Thread(target=sdk_chat))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=660)
    assert not failures(records), failures(records)
    assert len(sdk_answers) == 1, "the SDK's request failed (its exception is in the output above)"
    assert all(record.heartbeats >= 1 for record in records), [record.heartbeats for record in records]
    first_token = min(record.first_token for record in records if record.first_token is not None)
    timeline.marks.append((round(first_token - timeline.origin, 2), "first token after zero"))
    REPORT["zero to the first token (s)"] = round(first_token - burst, 1)
    REPORT["heartbeats per stream while waiting"] = [record.heartbeats for record in records]
    assert deployment(stack).spec.replicas == 1
    woke = timeline.first(lambda s: (s.get("replicas") or 0) >= 1, after=burst)
    if woke is not None:
        REPORT["from zero: burst to the HPA's decision (s)"] = round(woke - burst, 1)

    # Idle again: back to zero.
    idle = timeline.mark("idle")
    wait_for(lambda: replicas_are(stack, 0), "the model back at zero replicas", SCALE_DOWN)
    REPORT["idle to zero replicas (s)"] = round(timeline.mark("zero replicas again") - idle, 1)
