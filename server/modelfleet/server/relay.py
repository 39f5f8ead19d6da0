"""A generation's way out: a queue slot, a replica, the backend, and the answer back to the client, whole
or as it streams; the cache on the way.

complete():  cache (with coalescing) -> queue slot -> replica (by prefix, or least loaded) -> backend -> accounting.
stream():    cache replay, or queue slot (heartbeats while waiting) -> replica -> backend chunks.

The API modules (api/openai.py, api/responses.py, api/compat.py) only translate their request into a
`Generation` (admission.py) and the OpenAI-shaped results back into their own format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from modelfleet.server.admission import (
    Generation,
    account,
    observe,
    prompt_tokens_estimate,
    settle,
    status_class_of,
    tokens_used,
)
from modelfleet.server.backends.base import Backend, Chunk, StreamBroken
from modelfleet.server.cache import Lookup
from modelfleet.server.errors import UPSTREAM_ERROR, UPSTREAM_TIMEOUT, BackendUnreachable, RouterError
from modelfleet.server.queue import Ticket
from modelfleet.server.registry import ServedModel
from modelfleet.server.services import Services
from modelfleet.server.streaming import Assembler, MessagesAssembler, messages_text, replay_chunks, replayable

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Heartbeat:
    """Nothing to send yet: the stream waits for a slot or a replica."""


@dataclass
class StreamFailure:
    """The generation failed after the client got its 200: the API sends an error event and ends."""

    error: RouterError


StreamEvent = Chunk | Heartbeat | StreamFailure


def pick_backend(services: Services, model: ServedModel) -> Backend:
    return services.backends[model.spec.api]


async def complete(generation: Generation) -> tuple[dict[str, Any], Lookup]:
    """The whole answer (OpenAI shape, `model` set to the name the router serves) and how the cache saw it."""
    services = generation.services
    try:
        if generation.cache_key is not None and services.cache is not None:
            result, lookup = await services.cache.get_or_compute(
                generation.name, generation.cache_key, generation.model.spec.cache_ttl_seconds,
                lambda: run_backend(generation),
            )  # fmt: skip
        else:
            result, lookup = await run_backend(generation), "bypass"
    except BaseException as exc:
        record_upstream_error(generation, exc)
        observe(generation, status_class_of(exc), "miss")
        raise
    finally:
        # Whatever was not charged (a cache hit, a request that joined another's generation, a failure).
        await settle(generation, 0)
    observe(generation, "2xx", lookup)
    return {**result, "model": generation.answer_name}, lookup


async def count_tokens(services: Services, model: ServedModel, body: dict[str, Any]) -> dict[str, Any]:
    """The backend's count of a Messages request's input tokens, from one of the model's replicas (no queue slot:
    counting generates nothing)."""
    backend = pick_backend(services, model)
    endpoint = model.pick_endpoint()
    try:
        return await backend.count_tokens(endpoint, model.spec, body)
    finally:
        model.release_endpoint(endpoint)


def record_upstream_error(generation: Generation, exc: BaseException) -> None:
    if isinstance(exc, RouterError) and exc.type == "upstream_error":
        metrics = generation.services.metrics
        metrics.child(metrics.upstream_errors, generation.name, exc.code or "unknown").inc()


async def on_a_replica(generation: Generation, call: Callable[[str], Awaitable[T]]) -> tuple[str, T]:
    """`call` on a replica of the model, and that replica, whose endpoint the caller releases.

    A replica that refuses the connection (a pod that has just stopped, before the router saw its
    EndpointSlice change) never saw the request: the next one gets it, until every replica has refused.
    """
    model = generation.model
    refused: list[str] = []
    while True:
        endpoint = model.pick_endpoint(exclude=refused, affinity=generation.affinity)
        try:
            return endpoint, await call(endpoint)
        except BackendUnreachable:
            model.release_endpoint(endpoint)
            refused.append(endpoint)
            if len(refused) >= len(model.outstanding):
                raise
        except BaseException:
            model.release_endpoint(endpoint)
            raise


async def run_backend(generation: Generation) -> dict[str, Any]:
    """Queue slot, a replica, one backend call; this is what the cache computes on a miss."""
    model = generation.model
    backend = pick_backend(generation.services, model)
    async with model.queue.slot(model.spec.request_timeout_seconds, generation.claim) as waited:
        generation.queue_seconds = waited
        started = time.monotonic()
        try:
            endpoint, result = await on_a_replica(
                generation, lambda endpoint: backend.complete(endpoint, model.spec, generation.kind, generation.body)
            )
            model.release_endpoint(endpoint)
        finally:
            generation.backend_seconds = time.monotonic() - started
    await account(generation, result.get("usage"))
    return result


@dataclass
class StreamPlan:
    """What an API needs to answer a streaming request: its events, and whether they came from the cache."""

    events: AsyncIterator[StreamEvent]
    cached: bool


async def stream(generation: Generation) -> StreamPlan:
    """The stream's plan (see `plan_stream`); a token reservation not charged by its end is refunded."""
    try:
        plan = await plan_stream(generation)
    except BaseException:
        await settle(generation, 0)
        raise
    if generation.reservation is None:
        return plan
    return StreamPlan(settled_at_end(generation, plan.events), plan.cached)


async def settled_at_end(generation: Generation, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    used = 0
    try:
        async for event in events:
            yield event
    except (GeneratorExit, asyncio.CancelledError):
        # The client left mid-stream. The backend generated for it until then: it is charged its prompt and
        # the tokens relayed (engines stream about one a chunk), never nothing, or leaving just before the
        # end would dodge the token budget. A client that left while it waited in line used nothing.
        if generation.backend_started is not None:
            used = prompt_tokens_estimate(generation.body) + generation.relayed_text_chunks
        raise
    finally:
        await settle(generation, used)


async def plan_stream(generation: Generation) -> StreamPlan:
    """Decide everything that can still become an HTTP error, then hand over the events.

    A full queue (429) and a backend that refuses the request (4xx/502) are reported with their
    status while that is still possible; a request that must wait gets its 200 at once so that
    heartbeats can keep the connection alive.
    """
    services = generation.services
    model = generation.model
    if generation.cache_key is not None and services.cache is not None:
        cached, _lookup = await services.cache.get(generation.name, generation.cache_key)
        if cached is not None and replayable(cached):
            observe(generation, "2xx", "hit")
            return StreamPlan(iter_async(replay_chunks({**cached, "model": generation.answer_name})), cached=True)
    try:
        ticket = model.queue.admit(generation.claim, model.spec.request_timeout_seconds)
    except RouterError as exc:
        observe(generation, status_class_of(exc), "miss")
        raise
    if not ticket.granted:
        return StreamPlan(wait_then_relay(generation, ticket), cached=False)
    try:
        endpoint, chunks = await open_upstream(generation, ticket)
    except BaseException as exc:
        ticket.release()
        observe(generation, status_class_of(exc), "miss")
        raise
    return StreamPlan(relay(generation, ticket, endpoint, chunks), cached=False)


async def iter_async(events: Iterator[Chunk]) -> AsyncIterator[StreamEvent]:
    for event in events:
        yield event


async def open_upstream(generation: Generation, ticket: Ticket) -> tuple[str, AsyncIterator[Chunk]]:
    """The stream of a replica (see `on_a_replica`), once the ticket's slot is granted."""
    model = generation.model
    generation.queue_seconds = await ticket.wait(0)
    generation.backend_started = time.monotonic()
    backend = pick_backend(generation.services, model)
    try:
        return await on_a_replica(
            generation, lambda endpoint: backend.open_stream(endpoint, model.spec, generation.kind, generation.body)
        )
    except BaseException as exc:
        record_upstream_error(generation, exc)
        raise


async def wait_then_relay(generation: Generation, ticket: Ticket) -> AsyncIterator[StreamEvent]:
    """Wait in line with heartbeats, then stream; failures now become events, since the 200 is sent."""
    heartbeat = generation.services.settings.heartbeat_seconds
    waiting = asyncio.ensure_future(ticket.wait(generation.model.spec.request_timeout_seconds))
    opened: tuple[str, AsyncIterator[Chunk]] | None = None
    status_class = "cancelled"  # unless it gets further: the client left while waiting
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=heartbeat)
            if done:
                break
            yield Heartbeat()
        waiting.result()
        opened = await open_upstream(generation, ticket)
    except RouterError as error:
        status_class = status_class_of(error)
        yield StreamFailure(error)
    finally:
        if opened is None:
            waiting.cancel()
            ticket.release()
            observe(generation, status_class, "miss")
    if opened is not None:
        endpoint, chunks = opened
        async for event in relay(generation, ticket, endpoint, chunks):
            yield event


async def relay(
    generation: Generation, ticket: Ticket, endpoint: str, chunks: AsyncIterator[Chunk]
) -> AsyncIterator[StreamEvent]:
    """Each upstream chunk as it arrives, timed; the cache gets the assembled answer if it completes.

    Starlette cancels this generator when the client disconnects; closing `chunks` then closes
    the upstream connection, which is what stops the generation.
    """
    services = generation.services
    metrics = services.metrics
    messages = generation.kind == "messages"
    assembler = (MessagesAssembler() if messages
                 else Assembler(chat=generation.kind == "chat", rebuild=generation.cache_key is not None))  # fmt: skip
    token_gaps = metrics.child(metrics.inter_token_latency, generation.name)
    first_token_at: float | None = None
    last_token_at = 0.0
    status_class = "2xx"
    started = time.monotonic()
    try:
        async for chunk in chunks:
            name_chunk(chunk, generation.answer_name, messages)
            assembler.add(chunk)
            if messages_text(chunk) if messages else has_text(chunk):
                generation.relayed_text_chunks += 1
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                    generation.first_token_seconds = now - (generation.backend_started or started)
                    metrics.child(metrics.time_to_first_token, generation.name, generation.route).observe(
                        now - generation.started
                    )
                else:
                    token_gaps.observe(now - last_token_at)
                last_token_at = now
            yield chunk
    except StreamBroken as exc:
        status_class = "5xx"
        logger.warning("backend of %s failed mid-stream: %s", generation.name, exc)
        if exc.timed_out:
            metrics.child(metrics.upstream_errors, generation.name, "mid_stream_timeout").inc()
            yield StreamFailure(UPSTREAM_TIMEOUT(f"The backend for `{generation.name}` stopped sending mid-stream."))
        else:
            metrics.child(metrics.upstream_errors, generation.name, "mid_stream").inc()
            yield StreamFailure(UPSTREAM_ERROR(f"The backend for `{generation.name}` failed mid-stream."))
    except Exception:
        # Anything else (a backend line of an unexpected shape, a bug here): the client still gets an
        # error event and [DONE], never a stream that just stops. Cancellation is not an Exception.
        status_class = "5xx"
        logger.exception("relaying the stream of %s failed", generation.name)
        metrics.child(metrics.upstream_errors, generation.name, "mid_stream").inc()
        yield StreamFailure(
            UPSTREAM_ERROR(f"The stream from the backend for `{generation.name}` could not be relayed.")
        )
    except BaseException as exc:
        status_class = status_class_of(exc)
        raise
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        generation.backend_seconds = time.monotonic() - started
        generation.model.release_endpoint(endpoint)
        ticket.release()
        observe(generation, status_class, "miss" if generation.cache_key else "bypass")
    usage = assembler.usage
    if usage and first_token_at is not None and last_token_at > first_token_at:
        _, completion = tokens_used(usage)
        metrics.child(metrics.tokens_per_second, generation.name).observe(
            max(0, completion - 1) / (last_token_at - first_token_at)
        )
    await account(generation, usage)
    complete_answer = assembler.result()
    if generation.cache_key is not None and services.cache is not None and complete_answer is not None:
        await services.cache.put(generation.cache_key, complete_answer, generation.model.spec.cache_ttl_seconds)


def name_chunk(chunk: Chunk, name: str, messages: bool) -> None:
    """The model's name as the router serves it: on every OpenAI chunk, on Anthropic's message_start."""
    if not messages:
        chunk["model"] = name
    elif chunk.get("type") == "message_start" and isinstance(chunk.get("message"), dict):
        chunk["message"]["model"] = name


def has_text(chunk: Chunk) -> bool:
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content") or choice.get("text"):
            return True
    return False
