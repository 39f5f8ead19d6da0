"""The router's own client of the Kubernetes API server: credentials, and the errors of a list or watch.

It talks to the API server with httpx rather than the kubernetes client, whose blocking calls would stall
the router's event loop; the kubernetes package only loads credentials.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


class Expired(Exception):
    """The resourceVersion is too old (410 Gone): only a fresh list can continue."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class ApiServer:
    """How to reach the API server; the token is asked for on every request, so rotation is picked up."""

    base_url: str
    tls: ssl.SSLContext
    proxy: str | None
    sni_hostname: str | None
    authorization: Callable[[], str | None]

    def client(self) -> httpx.AsyncClient:
        # Env proxies are for the router's upstream traffic, not for the API server.
        return httpx.AsyncClient(
            base_url=self.base_url, verify=self.tls, proxy=self.proxy, trust_env=False, timeout=httpx.Timeout(30.0)
        )

    def request_options(self) -> dict[str, Any]:
        """Headers (with a current token) and TLS server name for one request."""
        headers = {"Accept": "application/json"}
        token = self.authorization()
        if token:
            headers["Authorization"] = token
        extensions = {"sni_hostname": self.sni_hostname} if self.sni_hostname else None
        return {"headers": headers, "extensions": extensions}


def load_api_server(kubeconfig: str | None) -> ApiServer:
    """Credentials from the pod's ServiceAccount in cluster, else from a kubeconfig file (blocking)."""
    # Imported here: a router that serves only static models never needs the kubernetes package.
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # The loader installs a hook that re-reads the rotated token file (at most once a minute).
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]

    tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None, cadata=cfg.ca_cert_data or None)
    if cfg.cert_file:
        tls.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    if not cfg.verify_ssl:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

    def authorization() -> str | None:
        # Runs the configuration's refresh hook (in-cluster token file, exec plugins) before answering.
        value: str | None = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        return value

    return ApiServer(
        base_url=str(cfg.host),
        tls=tls,
        proxy=cfg.proxy or None,
        sni_hostname=cfg.tls_server_name or None,
        authorization=authorization,
    )


def slim(body: dict[str, Any]) -> dict[str, Any]:
    """Drop managedFields: the bulk of most objects, and never read here."""
    with contextlib.suppress(AttributeError):
        body.get("metadata", {}).pop("managedFields", None)
    return body


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    if response.status_code == 410:
        raise Expired()
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.reason_phrase
    raise ApiError(response.status_code, message)
