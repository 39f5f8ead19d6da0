"""Which replica gets a request: the least loaded, or the one likely to hold its prompt's prefix.

An engine keeps the KV cache of the prompts it has just run and, when a new prompt starts with the
same tokens, evaluates only the rest (Ollama's cache slots, vLLM's prefix caching). Prefix affinity
sends requests that share a prefix to the same replica so that this cache hits:

- The affinity key is a digest of the prompt's *stable* prefix: for chat, the system messages and
  the first user message, role-tagged, cut at `AFFINITY_CHARS`. Later turns of a conversation
  append messages but never change these, so a whole conversation keeps its key, and conversations
  spread over the replicas one by one. Only conversations that open with the same very long system
  prompt (past `AFFINITY_CHARS`) share a key, and hence a replica, where that prompt is cached.
- Rendezvous (highest-random-weight) hashing ranks the replicas for a key. It needs no shared
  state, so every router replica ranks alike; and when a replica comes or goes only the keys it
  ranked first move.
- Bounded load (consistent hashing with bounded loads): the first replica in rank order whose
  outstanding requests are below `LOAD_BOUND` times the mean (after this request), and below the
  replica's own cap, gets it. A hot prefix spills to its second choice instead of piling onto one
  replica. The least-loaded replica is always below the bound; only when every candidate is at its
  cap (some replicas refused the connection) does the least loaded take it anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Routing = Literal["prefix", "leastLoaded"]
ROUTINGS: tuple[Routing, ...] = ("prefix", "leastLoaded")

# About 1,000 tokens. A system prompt shorter than this keys each conversation apart (with its first
# question), which spreads load evenly; a longer one is worth a replica of its own: re-evaluating it
# costs more than the imbalance of sending every conversation that opens with it to one place.
AFFINITY_CHARS = 4096
# A replica may take up to 25 % more than the mean before its keys spill to their next choice.
LOAD_BOUND = 1.25


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts (other parts by type)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "") if part.get("type") == "text" else f"<{part.get('type')}>"
            for part in content
            if isinstance(part, dict)
        )
    return ""


def stable_prefix(body: Mapping[str, Any], limit: int = AFFINITY_CHARS) -> str:
    """The part of a request's prompt that later turns of its conversation keep, cut at `limit`.

    Chat: the messages up to and including the first user message, each as role and text (Anthropic's
    Messages API: its `system` field first, as a system message).
    Completions: the prompt (the first one, if there are several).
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        system = _text(body.get("system"))
        pieces: list[str] = [f"system\x1f{system}\x1e"] if system else []
        size = len(pieces[0]) if pieces else 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            piece = f"{message.get('role')}\x1f{_text(message.get('content'))}\x1e"
            pieces.append(piece)
            size += len(piece)
            if message.get("role") == "user" or size >= limit:
                break
        return "".join(pieces)[:limit]
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return prompt[:limit] if isinstance(prompt, str) else ""


def affinity_key(body: Mapping[str, Any]) -> bytes | None:
    """The digest that ranks replicas for this request, or None when its prompt has no text."""
    prefix = stable_prefix(body)
    if not prefix:
        return None
    return hashlib.blake2b(prefix.encode(), digest_size=16).digest()


def ranked(key: bytes, endpoints: Sequence[str]) -> list[str]:
    """The replicas in rendezvous order for `key`: the first is the key's home."""

    def weight(endpoint: str) -> bytes:
        return hashlib.blake2b(endpoint.encode(), digest_size=8, key=key).digest()

    return sorted(endpoints, key=weight, reverse=True)


def load_limit(outstanding: Mapping[str, int], bound: float = LOAD_BOUND) -> int:
    """Outstanding requests a replica must be below to take one more: `bound` x the mean after it."""
    return max(1, math.ceil(bound * (sum(outstanding.values()) + 1) / len(outstanding)))


def bounded_choice(
    key: bytes, outstanding: Mapping[str, int], cap: int | None = None, bound: float = LOAD_BOUND
) -> tuple[str, int]:
    """The first replica in `key`'s rank order below the load limit and `cap`, and its rank (0: home)."""
    limit = load_limit(outstanding, bound)
    if cap is not None:
        limit = min(limit, cap)
    order = ranked(key, list(outstanding))
    for rank, endpoint in enumerate(order):
        if outstanding[endpoint] < limit:
            return endpoint, rank
    least = min(order, key=outstanding.__getitem__)
    return least, order.index(least)
