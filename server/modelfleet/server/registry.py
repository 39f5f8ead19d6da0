"""Which models exist and where they live.  Today: static models from settings."""

from __future__ import annotations

from dataclasses import dataclass

from modelfleet.server.errors import RouterError
from modelfleet.server.settings import StaticModel


@dataclass(frozen=True)
class ModelRoute:
    name: str
    base_url: str
    upstream_model: str
    max_in_flight: int = 4
    max_queue: int = 64
    request_timeout_seconds: float = 300.0


class ModelRegistry:
    def __init__(self, models: list[StaticModel]) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._names: list[str] = []
        for model in models:
            route = ModelRoute(
                name=model.name,
                base_url=str(model.url).rstrip("/"),
                upstream_model=model.upstream_model or model.name,
                max_in_flight=model.max_in_flight,
                max_queue=model.max_queue,
                request_timeout_seconds=model.request_timeout_seconds,
            )
            self._names.append(model.name)
            for name in [model.name, *model.aliases]:
                self._routes[name] = route

    def resolve(self, name: str) -> ModelRoute:
        route = self._routes.get(name)
        if route is None:
            raise RouterError(
                404,
                f"The model `{name}` does not exist.",
                type="not_found_error",
                code="model_not_found",
                param="model",
            )
        return route

    def routes(self) -> list[ModelRoute]:
        return [self._routes[name] for name in self._names]

    def names(self) -> list[str]:
        return list(self._names)
