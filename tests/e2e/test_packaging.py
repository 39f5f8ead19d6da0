"""Each extra of the package installs into an empty venv, and its entry point really starts.

The container images install exactly `modelfleet[operator]` or `modelfleet[server]`, never the dev
extra every other test runs from. A dependency missing from an extra crashes the image at import,
so these tests build the wheel, install one extra into a new venv with nothing else in it, and run
the entry point the image runs: the router must answer HTTP, the operator must reconcile a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, http_ok, wait_for
from tests.support.procs import LOOPBACK, free_port, running_process

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built the way the Dockerfiles' builder stage builds it."""
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO_ROOT)],
        "pip wheel of the project")  # fmt: skip
    (built,) = out.glob("modelfleet-*.whl")
    return built


def clean_venv(wheel: Path, extra: str, root: Path) -> Path:
    """A venv without system site-packages holding only `modelfleet[extra]` and what it declares."""
    venv = root / f"venv-{extra}"
    run([sys.executable, "-m", "venv", str(venv)], f"creating the {extra} venv")
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[{extra}]"],
        f"pip install modelfleet[{extra}]")  # fmt: skip
    return python


def bare_env(home: Path, **settings: str) -> dict[str, str]:
    """No PYTHONPATH, no dev venv on PATH: what the package alone provides."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **settings}


def test_server_extra_alone_runs_the_router(wheel: Path, tmp_path: Path) -> None:
    python = clean_venv(wheel, "server", tmp_path)
    port = free_port()
    env = bare_env(
        tmp_path, MODELFLEET_HOST=LOOPBACK, MODELFLEET_PORT=str(port), MODELFLEET_AUTH_REQUIRED="false",
        MODELFLEET_MODELS=json.dumps([{"name": "echo", "url": f"http://{LOOPBACK}:9", "api": "openai"}]),
    )  # fmt: skip
    with (
        running_process(
            "router-clean-venv", [str(python), "-m", "modelfleet.server"], tmp_path, env=env, cwd=tmp_path,
            ready=lambda: http_ok(f"http://{LOOPBACK}:{port}/readyz"), ready_timeout=60,
        ),
        urllib.request.urlopen(f"http://{LOOPBACK}:{port}/v1/models", timeout=5) as response,
    ):  # fmt: skip
        models = json.load(response)
    assert [model["id"] for model in models["data"]] == ["echo"]


@pytest.fixture
def scoped_model(cluster: Cluster, inferencemodel_crd: str, namespace: str, http_endpoint: str) -> str:
    """An endpoint InferenceModel in the test's namespace (deleted with it); returns its name."""
    body = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "packaged", "namespace": namespace},
        "spec": {"model": "gemma3:270m", "endpoint": {"url": http_endpoint, "api": "openai"}},
    }
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        "modelfleet.io", "v1alpha1", namespace, "inferencemodels", body
    )
    return "packaged"


def test_operator_extra_alone_runs_the_operator(
    wheel: Path, tmp_path: Path, cluster: Cluster, namespace: str, scoped_model: str
) -> None:
    python = clean_venv(wheel, "operator", tmp_path)
    liveness = free_port()
    env = bare_env(
        tmp_path,
        KUBECONFIG=str(cluster.kubeconfig),
        MODELFLEET_OPERATOR_STANDALONE="true",
        # Scoped to the test's namespace, so that it never reconciles another test's models.
        MODELFLEET_OPERATOR_NAMESPACES=json.dumps([namespace]),
        MODELFLEET_OPERATOR_LIVENESS_HOST=LOOPBACK,
        MODELFLEET_OPERATOR_LIVENESS_PORT=str(liveness),
        MODELFLEET_OPERATOR_METRICS_HOST=LOOPBACK,
        MODELFLEET_OPERATOR_METRICS_PORT=str(free_port()),
    )
    custom = client.CustomObjectsApi(cluster.api)

    def reconciled() -> bool:
        model = custom.get_namespaced_custom_object("modelfleet.io", "v1alpha1", namespace, "inferencemodels",
                                                    scoped_model)  # fmt: skip
        conditions = model.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    with running_process(
        "operator-clean-venv", [str(python), "-m", "modelfleet.operator"], tmp_path, env=env, cwd=tmp_path,
        ready=lambda: http_ok(f"http://{LOOPBACK}:{liveness}/healthz"), ready_timeout=120,
    ):  # fmt: skip
        wait_for(reconciled, f"the clean-venv operator to reconcile {namespace}/{scoped_model} to Ready", timeout=120)
