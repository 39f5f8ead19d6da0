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


class ModelRegistry:
    def __init__(self, models: list[StaticModel]) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._names: list[str] = []
        for model in models:
            route = ModelRoute(
                name=model.name, base_url=str(model.url).rstrip("/"), upstream_model=model.upstream_model or model.name
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

    def names(self) -> list[str]:
        return list(self._names)
