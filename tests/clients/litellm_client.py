"""litellm as an application uses it, against the router; run with .venv-litellm's python (make install-litellm).

litellm cannot share .venv with the kubernetes client (see litellm-requirements.txt), so
tests/integration/test_client_litellm.py runs this script as a subprocess and asserts on the
JSON object it prints: what litellm returned or raised for each call, as plain data.

    .venv-litellm/bin/python tests/clients/litellm_client.py --api-base URL/v1 --api-key KEY --model gemma
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

# litellm fetches its price list from the internet at import unless told to use the copy it ships.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm

# Its hints ("Provider List: ...", "Give Feedback / Get Help") after each failed call say nothing here.
litellm.suppress_debug_info = True

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def usage_of(obj: Any) -> dict[str, int] | None:
    usage = getattr(obj, "usage", None)
    if usage is None:
        return None
    return {name: getattr(usage, name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}


def call(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of every call: an `openai/` model is any OpenAI-compatible server at api_base."""
    return {
        "model": f"openai/{args.model}",
        "api_base": args.api_base,
        "api_key": args.api_key,
        "messages": MESSAGES,
        # Greedy decoding: a streamed and a non-streamed answer are then the same text.
        "temperature": 0,
        "max_tokens": 16,
        "max_retries": 0,  # a retry would hide an error and double the backend calls the test counts
        "timeout": 120,
        **overrides,
    }


def completion(args: argparse.Namespace) -> dict[str, Any]:
    response = litellm.completion(**call(args))
    choice = response.choices[0]
    return {
        "type": type(response).__name__,
        "model": response.model,
        "role": choice.message.role,
        "text": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": usage_of(response),
    }


def summarize_stream(chunks: list[Any]) -> dict[str, Any]:
    """What an application sees of a stream: each delta, the usage chunks, and litellm's own reassembly."""
    deltas = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    rebuilt = litellm.stream_chunk_builder(chunks, messages=MESSAGES)
    return {
        "chunk_types": sorted({type(chunk).__name__ for chunk in chunks}),
        "chunks": len(chunks),
        "content_chunks": sum(1 for delta in deltas if delta),
        "text": "".join(deltas),
        "models": sorted({chunk.model for chunk in chunks}),
        "finish_reasons": [reason for reason in finish_reasons if reason],
        "usages": [usage for usage in map(usage_of, chunks) if usage is not None],
        "rebuilt_text": rebuilt.choices[0].message.content,
        "rebuilt_usage": usage_of(rebuilt),
    }


def stream(args: argparse.Namespace) -> dict[str, Any]:
    chunks = list(litellm.completion(**call(args, stream=True, stream_options={"include_usage": True})))
    return summarize_stream(chunks)


async def async_stream(args: argparse.Namespace) -> dict[str, Any]:
    response = await litellm.acompletion(**call(args, stream=True, stream_options={"include_usage": True}))
    return summarize_stream([chunk async for chunk in response])


def error_of(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The exception a call raises, as data (the test asserts that there is one)."""
    try:
        litellm.completion(**call(args, **overrides))
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "bases": [cls.__module__ + "." + cls.__qualname__ for cls in type(exc).__mro__],
            "status_code": getattr(exc, "status_code", None),
            "message": str(exc),
        }
    return {"type": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-base", required=True, help="the router's OpenAI base URL, ending in /v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    # litellm prints hints ("Provider List: ...") to stdout when a call fails; stdout is for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        results = {
            "completion": completion(args),
            "stream": stream(args),
            "async_stream": asyncio.run(async_stream(args)),
            "unknown_model": error_of(args, model="openai/no-such-model"),
            "bad_key": error_of(args, api_key="mf-not-a-key"),
        }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
