"""`python -m modelfleet.server`: serve the router with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import logging

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelfleet.server.app import create_app
from modelfleet.server.settings import RouterSettings


class ListenSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a pod).")
    port: int = Field(8000, description="Port to listen on.")
    access_log: bool = Field(False, description="Log every request (costs CPU per request; metrics count them).")


def main() -> None:
    listen = ListenSettings()
    # httpx (discovery's client) logs every request at INFO: noise, and URLs do not belong in logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(RouterSettings()),
        host=listen.host,
        port=listen.port,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=30,
        log_level="info",
        access_log=listen.access_log,
    )


if __name__ == "__main__":
    main()
