"""A generation's way in: who is calling, which model, the remote and max_tokens policies, the cache key,
the caller's place in a fair queue and the rate limit; and, at its end, what it is charged.

prepare() turns a validated request into a `Generation` (or refuses it with an error the client can act
on); relay.py runs it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from modelfleet.server.auth import Principal, authenticated
from modelfleet.server.backends.base import Kind
from modelfleet.server.cache import Lookup, cache_key, cacheable
from modelfleet.server.errors import (
    INVALID_PRIORITY,
    MAX_TOKENS_EXCEEDED,
    PROMPT_TOO_LONG,
    RATE_LIMIT_REQUESTS,
    RATE_LIMIT_TOKENS,
    RATE_LIMITER_UNAVAILABLE,
    REMOTE_NOT_ALLOWED,
    TOKENS_EXCEED_LIMIT,
    RouterError,
)
from modelfleet.server.queue import BANDS, Claim
from modelfleet.server.ratelimit import Decision, Limits, RateLimiterUnavailable, Reservation
from modelfleet.server.registry import ServedModel
from modelfleet.server.routing import affinity_key
from modelfleet.server.schemas import CountTokensRequest, MessagesRequest, SamplingFields
from modelfleet.server.services import Services


@dataclass
class Generation:
    """A validated request on its way to a model, in OpenAI terms."""

    services: Services
    model: ServedModel
    kind: Kind
    route: str  # the metrics label: the API path it came in by
    body: dict[str, Any]  # the upstream body: the backend's model name, bounded max_tokens
    principal: Principal
    limits: Limits
    cache_key: str | None
    claim: Claim = field(default_factory=Claim)  # its place in a busy model's fair queue
    affinity: bytes | None = None  # its prompt prefix's key, for a model routed by prefix
    started: float = field(default_factory=time.monotonic)
    rate_limit: Decision | None = None
    # Tokens reserved against the key's budget at admission, until settled with the real count.
    reservation: Reservation | None = None
    queue_seconds: float = 0.0
    backend_seconds: float = 0.0
    # When a streamed request was sent to the backend, and how long its first token took from there
    # (a whole answer arrives at once: no first token of its own).
    backend_started: float | None = None
    first_token_seconds: float | None = None
    # Chunks of text relayed to a streaming client, what it is charged at least if it leaves early.
    relayed_text_chunks: int = 0

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def answer_name(self) -> str:
        """The model an answer names: a LoRA adapter's own name (a model of its own to clients), else the model's."""
        asked = self.body.get("model")
        return asked if asked in self.model.spec.adapters else self.model.name

    def response_headers(self) -> dict[str, str]:
        return self.rate_limit.headers() if self.rate_limit is not None else {}


def upstream_body(request: SamplingFields | MessagesRequest, model: ServedModel, services: Services) -> dict[str, Any]:
    """The request as the backend should see it: its model name, and max_tokens bounded by policy."""
    body = request.model_dump(exclude_none=True, exclude={"n", "stream", "stream_options", "use_cache",
                                                          "allow_remote"})  # fmt: skip
    # Ollama's own name for it (a vendor extension) is held to the same limit.
    requested = (
        body.pop("max_completion_tokens", None)
        or body.get("max_tokens")
        or ((body.get("options") or {}).get("num_predict") if isinstance(body.get("options"), dict) else None)
    )
    cap = services.settings.max_tokens_cap
    if requested is not None and requested > cap:
        raise MAX_TOKENS_EXCEEDED(f"max_tokens is {requested}, above this server's limit of {cap}.", param="max_tokens")
    body["max_tokens"] = requested or services.settings.default_max_tokens
    # An adapter is asked for by its own name; any other name the model answers to, by the model's.
    body["model"] = request.model if request.model in model.spec.adapters else model.spec.upstream_model
    field = "messages" if "messages" in body else "prompt"
    length, limit = prompt_chars(body.get(field)) + prompt_chars(body.get("system")), services.settings.max_prompt_chars
    if length > limit:
        # Characters, not tokens: the router has no tokenizer, and a backend would truncate silently.
        raise PROMPT_TOO_LONG(f"The prompt has {length} characters, above this server's limit of {limit}.", param=field)
    return body


PRIORITY_HEADER = "x-modelfleet-priority"


def queue_claim(http_request: Request, principal: Principal) -> Claim:
    """The caller's fair share; the priority header may lower the key's priority, never raise it."""
    asked = http_request.headers.get(PRIORITY_HEADER)
    priority = principal.priority
    if asked is not None:
        if asked not in BANDS:
            raise INVALID_PRIORITY(f"{PRIORITY_HEADER} must be one of {', '.join(BANDS)}, not {asked[:40]!r}.",
                                   param=PRIORITY_HEADER)  # fmt: skip
        priority = asked if BANDS[asked] > BANDS[priority] else priority
    return Claim(principal.subject, principal.weight, priority)


def prompt_chars(value: Any) -> int:
    """The characters of text in a prompt, messages or content parts (JSON keys and roles do not count)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(prompt_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(prompt_chars(value.get(key)) for key in ("content", "text"))
    return 0


def wants_cache(http_request: Request, services: Services, model: ServedModel, body: dict[str, Any],
                use_cache: bool, route: str) -> bool:  # fmt: skip
    directives = http_request.headers.get("cache-control", "").lower()
    return (
        use_cache
        and services.cache is not None
        and model.spec.cache_enabled
        and "no-cache" not in directives
        and "no-store" not in directives
        and (route in services.settings.sampled_cache_routes or cacheable(body))
    )


async def prepare(
    services: Services,
    http_request: Request,
    request: SamplingFields | MessagesRequest,
    kind: Kind,
    route: str,
    use_cache: bool = True,
    allow_remote: bool = False,
) -> Generation:
    principal = authenticated(http_request, services.keys)
    model = services.registry.resolve(request.model)
    if model.spec.remote and not allow_remote:
        raise REMOTE_NOT_ALLOWED(f"`{model.name}` is served by a remote provider; set `allow_remote: true` in the "
                                 "request to allow sending it there.", param="allow_remote")  # fmt: skip
    body = upstream_body(request, model, services)
    settings = services.settings
    limits = Limits(
        requests=first_set(principal.requests_per_minute, model.spec.requests_per_minute,
                           settings.rate_limit_requests_per_minute),
        tokens=first_set(principal.tokens_per_minute, model.spec.tokens_per_minute,
                         settings.rate_limit_tokens_per_minute),
        window_seconds=settings.rate_limit_window_seconds,
    )  # fmt: skip
    # Per key unless the model shares its answers: a shared hit would tell one caller what another asked.
    shared = model.spec.cache_shared_across_keys or not settings.cache_per_key
    namespace = "" if shared else principal.subject
    key = cache_key(model.name, kind, body, namespace) if wants_cache(http_request, services, model, body,
                                                                      use_cache, route) else None  # fmt: skip
    affinity = affinity_key(body) if model.spec.routing == "prefix" else None
    generation = Generation(services, model, kind, route, body, principal, limits, key,
                            claim=queue_claim(http_request, principal), affinity=affinity)  # fmt: skip
    await admit_rate(generation)
    return generation


def prepare_count(
    services: Services, http_request: Request, request: CountTokensRequest
) -> tuple[ServedModel, dict[str, Any]]:
    """A token count's model and upstream body: the caller's key, the model by name or alias, and the remote policy.

    Counting generates nothing, so it takes no queue slot and no token budget."""
    authenticated(http_request, services.keys)
    model = services.registry.resolve(request.model)
    if model.spec.remote and not request.allow_remote:
        raise REMOTE_NOT_ALLOWED(f"`{model.name}` is served by a remote provider; set `allow_remote: true` in the "
                                 "request to allow sending it there.", param="allow_remote")  # fmt: skip
    body = request.model_dump(exclude_none=True, exclude={"allow_remote"})
    body["model"] = request.model if request.model in model.spec.adapters else model.spec.upstream_model
    return model, body


def first_set(*values: int | None) -> int | None:
    """The first configured value; 0 means "no limit"."""
    for value in values:
        if value is not None:
            return value or None
    return None


# OpenAI's rule of thumb for English: about 4 characters per token.  A prompt's real count is charged
# when the answer ends, so an estimate only decides admission.
CHARS_PER_TOKEN = 4


def prompt_tokens_estimate(body: dict[str, Any]) -> int:
    field_name = "messages" if "messages" in body else "prompt"
    # Anthropic's system prompt is a field of its own.
    return -(-(prompt_chars(body.get(field_name)) + prompt_chars(body.get("system"))) // CHARS_PER_TOKEN)


def tokens_to_reserve(body: dict[str, Any]) -> int:
    """The most a request may cost: its prompt's estimated tokens plus its max_tokens."""
    return prompt_tokens_estimate(body) + int(body.get("max_tokens") or 0)


async def admit_rate(generation: Generation) -> None:
    limits = generation.limits
    if limits.requests is None and limits.tokens is None:
        return
    services = generation.services
    subject = f"{generation.principal.subject}|{generation.name}"
    reserve = tokens_to_reserve(generation.body) if limits.tokens is not None else 0
    if limits.tokens is not None and reserve > limits.tokens:
        # No wait makes it fit: say what to change rather than a 429 that clients would retry.
        per = f"{limits.window_seconds:g}s" if limits.window_seconds != 60 else "minute"
        max_tokens = int(generation.body.get("max_tokens") or 0)
        raise TOKENS_EXCEED_LIMIT(f"This request may use {reserve} tokens (its prompt, about {reserve - max_tokens}, "
                                  f"plus max_tokens {max_tokens}), more than the {limits.tokens} tokens per {per} "
                                  f"your key may use for `{generation.name}`; lower max_tokens.",
                                  param="max_tokens")  # fmt: skip
    try:
        decision = await services.limiter.acquire(subject, limits, reserve=reserve)
    except RateLimiterUnavailable:
        services.metrics.child(services.metrics.rate_limited, generation.name, "unavailable").inc()
        raise RATE_LIMITER_UNAVAILABLE("The rate limiter is unavailable and this router fails closed; retry shortly.",
                                       headers={"retry-after": "1"}) from None  # fmt: skip
    generation.rate_limit = decision
    generation.reservation = decision.reservation
    if not decision.allowed:
        kind = decision.exceeded or "requests"
        services.metrics.child(services.metrics.rate_limited, generation.name, kind).inc()
        per = f"{limits.window_seconds:g}s" if limits.window_seconds != 60 else "minute"
        limit = decision.requests_limit if kind == "requests" else decision.tokens_limit
        exceeded = RATE_LIMIT_REQUESTS if kind == "requests" else RATE_LIMIT_TOKENS
        raise exceeded(f"Rate limit reached for `{generation.name}`: {limit} {kind} per {per}. "
                       f"Retry in {decision.retry_after_seconds}s.", headers=decision.headers())  # fmt: skip


async def account(generation: Generation, usage: dict[str, Any] | None) -> None:
    """Token metrics and the token budget, once the answer is complete."""
    if not usage:
        return
    services = generation.services
    prompt, completion = tokens_used(usage)
    metrics = services.metrics
    metrics.child(metrics.prompt_tokens, generation.name).inc(prompt)
    metrics.child(metrics.completion_tokens, generation.name).inc(completion)
    if generation.reservation is not None:
        await settle(generation, prompt + completion)
    elif generation.limits.tokens is not None and prompt + completion:
        subject = f"{generation.principal.subject}|{generation.name}"
        await services.limiter.charge_tokens(subject, generation.limits, prompt + completion)


def tokens_used(usage: dict[str, Any]) -> tuple[int, int]:
    """Prompt and completion tokens of OpenAI's usage, or of Anthropic's (whose input is split in three when a
    prompt cache is used: uncached, written to it, read from it)."""
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt = sum(int(usage.get(name) or 0) for name in ("input_tokens", "cache_creation_input_tokens",
                                                            "cache_read_input_tokens"))  # fmt: skip
        return prompt, int(usage.get("output_tokens") or 0)
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def settle(generation: Generation, used: int) -> None:
    """Replace the request's token reservation by what it used, once; 0 refunds it all (an answer from
    the cache, a failure, a client that left before its stream began)."""
    reservation, generation.reservation = generation.reservation, None
    if reservation is not None:
        await generation.services.limiter.settle(reservation, generation.limits, used)


def observe(generation: Generation, status_class: str, cache: Lookup | str) -> None:
    metrics = generation.services.metrics
    metrics.child(metrics.requests, generation.name, generation.route, status_class).inc()
    metrics.child(metrics.duration, generation.name, generation.route, cache).observe(
        time.monotonic() - generation.started
    )


def status_class_of(exc: BaseException) -> str:
    if isinstance(exc, RouterError):
        return f"{exc.status // 100}xx"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"  # the client went away
    return "5xx"
