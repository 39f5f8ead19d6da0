"""Load and unload: an InferenceModel's spec.replicas, set through its scale subresource.

This is what `kubectl scale inferencemodel <name> --replicas=N` does, and all the router may do to a
model: its ServiceAccount holds `patch` on `inferencemodels/scale` and nothing more.  The operator
turns spec.replicas 0 into no pods (and no HPA), and a value above 0 back into the model's pods.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson

from modelfleet.api.naming import scale_path
from modelfleet.server.errors import (
    KUBERNETES_ERROR,
    KUBERNETES_FORBIDDEN,
    KUBERNETES_UNAVAILABLE,
    MODEL_NOT_FOUND,
    SCALE_REFUSED,
    RouterError,
)
from modelfleet.server.kube_api import ApiServer, load_api_server


class ModelScaler:
    """Patches the scale subresource; the API server's credentials are loaded on first use."""

    def __init__(self, kubeconfig: str | None) -> None:
        self.kubeconfig = kubeconfig
        self._server: ApiServer | None = None
        self._http: httpx.AsyncClient | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> tuple[ApiServer, httpx.AsyncClient]:
        async with self._connecting:
            if self._server is None or self._http is None:
                # Loading a kubeconfig may run an exec credential plugin, which blocks.
                self._server = await asyncio.to_thread(load_api_server, self.kubeconfig)
                self._http = self._server.client()
            return self._server, self._http

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas; the API server's refusal becomes an error that says what to fix."""
        try:
            server, http = await self._connection()
            options = server.request_options()
            options["headers"]["Content-Type"] = "application/merge-patch+json"
            response = await http.patch(
                scale_path(namespace, name),
                content=orjson.dumps({"spec": {"replicas": replicas}}),
                **options,
            )
        except httpx.HTTPError as exc:
            raise KUBERNETES_UNAVAILABLE(
                f"The Kubernetes API server cannot be reached to scale `{name}`: {exc!r}."
            ) from exc
        if response.status_code == 200:
            return
        raise refusal(name, response)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def refusal(name: str, response: httpx.Response) -> RouterError:
    """The API server's answer to a failed patch, as the router's error."""
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.text[:300] or response.reason_phrase
    status = response.status_code
    if status == 404:
        return MODEL_NOT_FOUND(f"The InferenceModel `{name}` no longer exists: {message}")
    if status in (401, 403):
        return KUBERNETES_FORBIDDEN(f"The Kubernetes API server refused to scale `{name}` ({status}): {message}. The "
                                    "router's ServiceAccount needs `patch` on `inferencemodels/scale` (the Helm chart "
                                    "grants it when router.discovery is true).")  # fmt: skip
    if status in (409, 422):
        return SCALE_REFUSED(f"The Kubernetes API server refused to scale `{name}`: {message}")
    return KUBERNETES_ERROR(f"The Kubernetes API server failed to scale `{name}` ({status}): {message}")
