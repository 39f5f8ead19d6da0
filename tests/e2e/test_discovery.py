"""The router's discovery on the local cluster, running as the modelfleet-router ServiceAccount.

The operator does not run here: the test creates the Service and Deployment a managed model would
get, and the real EndpointSlice controller turns kwok's Ready pods into the slices discovery reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelfleet.api import v1alpha1
from modelfleet.server.discovery import ClusterWatcher
from modelfleet.server.model_spec import ModelSpec
from tests.e2e.conftest import Cluster, client_with_token, service_account_kubeconfig, wait_for
from tests.support.procs import LOOPBACK

pytestmark = pytest.mark.e2e

WAIT = 30.0


class RunningWatcher:
    """A ClusterWatcher on its own event loop in a thread, so the test can use the blocking kubernetes client."""

    def __init__(self, kubeconfig: Path, **options: Any) -> None:
        self._lock = threading.Lock()
        self._models: list[ModelSpec] = []
        self.deliveries = 0
        self.watcher = ClusterWatcher(self._on_change, kubeconfig=str(kubeconfig), **options)
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self.watcher.run())
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cluster-watcher", daemon=True)
        self._thread.start()

    def _on_change(self, models: list[ModelSpec]) -> None:
        with self._lock:
            self._models = models
            self.deliveries += 1

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by the test, which would otherwise only time out
            self.error = exc
        finally:
            self._loop.close()

    def spec(self, name: str) -> ModelSpec | None:
        assert self.error is None, f"the watcher stopped: {self.error!r}"
        with self._lock:
            return next((spec for spec in self._models if spec.name == name), None)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the watcher did not stop when cancelled"


@contextlib.contextmanager
def start_watcher(kubeconfig: Path, **options: Any) -> Iterator[RunningWatcher]:
    running = RunningWatcher(kubeconfig, **options)
    try:
        wait_for(running.watcher.synced.is_set, "the watcher's first complete list", timeout=WAIT)
        yield running
    finally:
        running.stop()


@pytest.fixture
def watcher(router_kubeconfig: Path) -> Iterator[RunningWatcher]:
    """A cluster-wide watcher, as the router runs it."""
    with start_watcher(router_kubeconfig) as running:
        yield running


def unique(prefix: str) -> str:
    # Names are cluster-wide for the router, and other tests share this cluster.
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def custom(cluster: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


def create_model(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}", "kind": v1alpha1.KIND, "metadata": {"name": name}}
    body["spec"] = spec
    custom(cluster).create_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, body)


def delete_model(cluster: Cluster, namespace: str, name: str) -> None:
    custom(cluster).delete_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name)


def test_endpoint_model_is_discovered_and_dropped_when_deleted(
    cluster: Cluster, namespace: str, watcher: RunningWatcher
) -> None:
    name = unique("gemma")
    create_model(cluster, namespace, name, {
        "model": "gemma3:270m",
        "endpoint": {"url": "http://127.0.0.1:18080/v1/", "api": "ollama"},
        "serving": {"aliases": [f"{name}-alias"], "maxQueue": 7, "rateLimit": {"requestsPerMinute": 60}},
    })  # fmt: skip
    wait_for(lambda: watcher.spec(name) is not None, f"{name} to be discovered", timeout=WAIT)
    assert watcher.spec(name) == ModelSpec(
        name=name,
        api="ollama",
        upstream_model="gemma3:270m",
        endpoints=("http://127.0.0.1:18080",),
        aliases=(f"{name}-alias",),
        max_queue=7,
        cache_enabled=True,
        cache_ttl_seconds=None,
        requests_per_minute=60,
        source="cluster",
        namespace=namespace,
    )
    assert watcher.watcher.healthy

    delete_model(cluster, namespace, name)
    wait_for(lambda: watcher.spec(name) is None, f"{name} to disappear", timeout=WAIT)


def test_remote_endpoint_without_allow_remote_is_not_served(
    cluster: Cluster, namespace: str, watcher: RunningWatcher
) -> None:
    refused, allowed = unique("remote"), unique("remote-ok")
    create_model(cluster, namespace, refused, {"model": "gpt-4o", "endpoint": {"url": "https://api.openai.com/v1"}})
    allowed_endpoint = {"url": "https://api.openai.com/v1", "allowRemote": True}
    create_model(cluster, namespace, allowed, {"model": "gpt-4o", "endpoint": allowed_endpoint})
    wait_for(lambda: watcher.spec(allowed) is not None, f"{allowed} to be discovered", timeout=WAIT)
    spec = watcher.spec(allowed)
    assert spec is not None
    assert spec.remote
    # Created first, so the watch stream, which is in order, delivered it before the allowed one.
    assert watcher.spec(refused) is None


def pod_urls(cluster: Cluster, namespace: str, app: str) -> tuple[str, ...]:
    """The base URLs of the app's Ready pods, as the kubelet (here kwok) reports them."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json").stdout)
    return tuple(
        sorted(
            f"http://{pod['status']['podIP']}:11434"
            for pod in pods["items"]
            if pod["status"].get("podIP")
            and "deletionTimestamp" not in pod["metadata"]
            and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or ())
        )
    )


def create_model_server(cluster: Cluster, namespace: str, name: str, app: str) -> None:
    """The Service and Deployment the operator would create for a managed Ollama model."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"im-{name}"},
        "spec": {
            "selector": {"app": app},
            "ports": [{"name": "http", "port": 11434, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"im-{name}"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {
                    # The untainted CPU node; kwok marks the pod Running and Ready and gives it an IP.
                    "nodeSelector": {"kubernetes.io/hostname": "cpu-node-0"},
                    "containers": [
                        {
                            "name": "ollama",
                            "image": "docker.io/ollama/ollama:0.17.4",
                            "ports": [{"name": "http", "containerPort": 11434}],
                        }
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump_all([service, deployment]))


def test_managed_model_endpoints_follow_its_ready_pods(
    cluster: Cluster, namespace: str, watcher: RunningWatcher
) -> None:
    name = unique("phi")
    app = name
    create_model(cluster, namespace, name, {"runtime": "ollama", "model": "phi3:mini"})
    wait_for(lambda: watcher.spec(name) is not None, f"{name} to be discovered", timeout=WAIT)
    spec = watcher.spec(name)
    assert spec is not None
    assert (spec.api, spec.upstream_model, spec.endpoints) == ("ollama", "phi3:mini", ())

    create_model_server(cluster, namespace, name, app)
    wait_for(lambda: len(pod_urls(cluster, namespace, app)) == 1, "one Ready pod", timeout=WAIT)
    one = pod_urls(cluster, namespace, app)
    wait_for(lambda: (s := watcher.spec(name)) is not None and s.endpoints == one, f"endpoints {one}", timeout=WAIT)

    cluster.kubectl("scale", "-n", namespace, f"deployment/im-{name}", "--replicas=2")
    wait_for(lambda: len(pod_urls(cluster, namespace, app)) == 2, "two Ready pods", timeout=WAIT)
    two = pod_urls(cluster, namespace, app)
    wait_for(lambda: (s := watcher.spec(name)) is not None and s.endpoints == two, f"endpoints {two}", timeout=WAIT)
    assert set(one) < set(two)

    delete_model(cluster, namespace, name)
    wait_for(lambda: watcher.spec(name) is None, f"{name} to disappear", timeout=WAIT)


RESUMED = "resuming at resourceVersion"


def test_changes_across_watch_restarts_are_seen(
    cluster: Cluster, namespace: str, router_kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="modelfleet.server.discovery")
    name = unique("restarts")

    def restarted_since(count: int) -> None:
        # Two kinds are watched: two more restarts mean each watch has (most likely) restarted once more.
        wait_for(lambda: caplog.text.count(RESUMED) >= count + 2, "the watches to restart", timeout=WAIT)

    def sees_max_queue(running: RunningWatcher, max_queue: int) -> None:
        wait_for(lambda: getattr(running.spec(name), "max_queue", None) == max_queue, f"maxQueue {max_queue}",
                 timeout=WAIT)  # fmt: skip

    # The server ends every watch after a second; a namespaced watcher covers the namespaced URLs too.
    with start_watcher(router_kubeconfig, namespace=namespace, watch_timeout_seconds=1) as running:
        create_model(cluster, namespace, name, {"model": "m", "endpoint": {"url": "http://llm.ai.svc"}})
        sees_max_queue(running, 64)
        for max_queue in (10, 11, 12):
            restarted_since(caplog.text.count(RESUMED))
            patch = {"spec": {"serving": {"maxQueue": max_queue}}}
            custom(cluster).patch_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name, patch
            )
            sees_max_queue(running, max_queue)

        restarted_since(caplog.text.count(RESUMED))
        delete_model(cluster, namespace, name)
        wait_for(lambda: running.spec(name) is None, f"{name} to disappear", timeout=WAIT)
        assert running.watcher.healthy
        assert caplog.text.count(RESUMED) >= 8
        # A watch that ends on time resumes where it stopped; it does not list everything again.
        assert "listing again" not in caplog.text


def test_router_account_may_read_models_but_nothing_else(cluster: Cluster, namespace: str, router_token: str) -> None:
    api = client_with_token(cluster, router_token)
    try:
        models = client.CustomObjectsApi(api)
        models.list_cluster_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, v1alpha1.PLURAL)
        client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces(limit=1)

        core = client.CoreV1Api(api)
        denied: list[Callable[[], object]] = [
            lambda: core.list_namespaced_secret(namespace),
            lambda: core.list_secret_for_all_namespaces(limit=1),
            lambda: core.list_namespaced_pod(namespace),
            lambda: core.list_namespaced_config_map(namespace),
            lambda: core.list_namespaced_service(namespace),
            lambda: models.create_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL,
                {"apiVersion": "modelfleet.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "x"},
                 "spec": {"model": "m", "endpoint": {"url": "http://llm.ai.svc"}}},
            ),
        ]  # fmt: skip
        for call in denied:
            with pytest.raises(ApiException) as error:
                call()
            assert error.value.status == 403
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_a_rejected_token_makes_the_watcher_unhealthy(cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = service_account_kubeconfig(cluster, "not-a-token", tmp_path / "kubeconfig")
    running = RunningWatcher(kubeconfig)
    try:
        wait_for(lambda: not running.watcher.healthy, "the watcher to report itself unhealthy", timeout=WAIT)
        assert not running.watcher.synced.is_set()
        assert running.deliveries == 0
    finally:
        running.stop()


class TcpForwarder:
    """A loopback TCP relay to the API server that the test can cut and restore, like a network outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every relayed connection: clients see resets and refused connections."""
        with self._lock:
            doomed, self._sockets = self._sockets, []
        if self._listener is not None:
            doomed.append(self._listener)
            self._listener = None
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_after_an_outage_the_watcher_relists_and_catches_up(
    cluster: Cluster, namespace: str, router_token: str, tmp_path: Path
) -> None:
    api_server = urlsplit(cluster.api.configuration.host)
    assert api_server.hostname is not None
    assert api_server.port is not None
    relay = TcpForwarder((api_server.hostname, api_server.port))
    relay.start()
    kubeconfig = service_account_kubeconfig(cluster, router_token, tmp_path / "kubeconfig")
    document = yaml.safe_load(kubeconfig.read_text())
    # The API server's certificate names 127.0.0.1, whatever the port, so TLS verification still holds.
    document["clusters"][0]["cluster"]["server"] = f"https://{LOOPBACK}:{relay.port}"
    kubeconfig.write_text(yaml.safe_dump(document))
    gone, added = unique("gone"), unique("added")
    endpoint = {"url": "http://llm.ai.svc"}
    try:
        with start_watcher(kubeconfig, namespace=namespace) as running:
            create_model(cluster, namespace, gone, {"model": "m", "endpoint": endpoint})
            wait_for(lambda: running.spec(gone) is not None, f"{gone} to be discovered", timeout=WAIT)

            relay.stop()
            wait_for(lambda: not running.watcher.healthy, "the watcher to notice the outage", timeout=WAIT)
            # Changes the watch cannot see: only a fresh list after the outage reveals them.
            delete_model(cluster, namespace, gone)
            create_model(cluster, namespace, added, {"model": "m", "endpoint": endpoint})
            assert running.spec(gone) is not None, "the last known list stands during an outage"

            relay.start()
            wait_for(lambda: running.watcher.healthy, "the watcher to recover", timeout=WAIT)
            wait_for(lambda: running.spec(added) is not None and running.spec(gone) is None, "the catch-up",
                     timeout=WAIT)  # fmt: skip
    finally:
        relay.stop()
