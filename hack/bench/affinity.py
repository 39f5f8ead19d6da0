"""`make bench` prefix affinity: least-loaded against prefix routing on two real Ollama replicas.

The workload is a support desk: a few long system prompts (about 1,600 characters each), each
opening several conversations, and one user per conversation who reads each answer for a moment
before asking the next question. Each turn appends the answer and a new question, so a replica
that still holds the conversation in its KV cache evaluates only the new tokens.

The modes alternate within one run, and each phase uses system prompts of its own, so that no
phase finds its prompts in a cache the previous phase warmed. Each replica runs one ggml thread
(they busy-wait; see run.py) and four requests at once: the CRD's default maxInFlightPerReplica,
which the operator passes to Ollama as OLLAMA_NUM_PARALLEL (its cache slots). Ollama's debug log
says, for every request, how many prompt tokens it took from its cache and how many it evaluated;
that is the prompt-evaluation work each mode caused.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from hack import ollama_model
from hack.bench.harness import BENCH_MODEL, LOOPBACK, Result, free_port, http_ok, log, p90, router, running

MODES = ("leastLoaded", "prefix")
PARALLEL = 4  # requests per replica at once: the CRD's default maxInFlightPerReplica
WORDS = (
    "harbour", "lamp", "keeper", "tide", "signal", "vessel", "north", "storm", "ledger", "cargo", "pier",
    "lantern", "crew", "beacon", "fog", "rope", "anchor", "chart", "compass", "season", "ferry", "permit",
    "dock", "customs", "berth", "manifest", "pilot", "buoy", "current", "shoal",
)  # fmt: skip
# "loading cache slot" id=0 cache=412 prompt=430 used=411 remaining=19
CACHE_SLOT = re.compile(r'msg="loading cache slot".* prompt=(\d+) used=(\d+) remaining=(\d+)')


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def system_prompt(rng: random.Random, desk: str) -> str:
    """About 1,600 characters of house rules: shorter than the affinity prefix, so each conversation has its key."""
    rules = [f"{number}. {sentence(rng, 14)}" for number in range(1, 17)]
    return f"You are the {desk} desk of the harbour office. Answer briefly. House rules:\n" + "\n".join(rules)


def conversations(seed: int, prompts: int, count: int) -> list[list[dict[str, str]]]:
    """`count` openings (system prompt and first question) over `prompts` system prompts."""
    rng = random.Random(seed)
    systems = [system_prompt(rng, f"desk {seed}-{index}") for index in range(prompts)]
    return [
        [{"role": "system", "content": systems[number % prompts]},
         {"role": "user", "content": f"Visitor {number}: {sentence(rng, 10)}"}]
        for number in range(count)
    ]  # fmt: skip


def first_token(
    base_url: str, messages: list[dict[str, str]], max_tokens: int, model: str = "bench"
) -> tuple[float, str]:
    """(seconds to the first content chunk, the whole answer) of one streamed chat (through the router)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-cache"},
    )  # fmt: skip
    started = time.monotonic()
    ttft = 0.0
    text: list[str] = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    ttft = ttft or time.monotonic() - started
                    text.append(content)
    return ttft, "".join(text)


def run_phase(
    base_url: str,
    openings: list[list[dict[str, str]]],
    turns: int,
    seed: int,
    think: tuple[float, float],
    stagger: float,
) -> list[tuple[int, float]]:
    """One user per conversation, all at once: each asks `turns` questions, pausing `think` seconds (a
    range) to read each answer; users start `stagger` seconds apart. The (turn, TTFT) of every request."""
    rng = random.Random(seed)
    pauses = [[rng.uniform(*think) for _ in range(turns)] for _ in openings]
    ttfts: list[tuple[int, float]] = []
    lock = threading.Lock()

    def user(number: int) -> None:
        messages = list(openings[number])
        time.sleep(stagger * number)
        for turn in range(turns):
            ttft, answer = first_token(base_url, messages, max_tokens=12)
            with lock:
                ttfts.append((turn, ttft))
            question = f"Follow-up {turn}: {messages[1]['content'][:60]}?"
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
            time.sleep(pauses[number][turn])

    # Daemons: a stopped bench (Ctrl-C, SIGTERM) unwinds at once and stops its servers, instead of
    # waiting on users blocked in their requests.
    threads = [threading.Thread(target=user, args=(number,), daemon=True) for number in range(len(openings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    return ttfts


def cache_reuse(log_path: Path, skip_lines: int) -> list[tuple[int, int]]:
    """(prompt tokens, tokens taken from the cache) of each request logged after line `skip_lines`."""
    lines = log_path.read_text(errors="replace").splitlines()[skip_lines:]
    return [(int(m.group(1)), int(m.group(2))) for line in lines if (m := CACHE_SLOT.search(line))]


def line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines())


def summarise(ttfts: list[tuple[int, float]], reuse: list[tuple[int, int]]) -> Result:
    every = [ttft for _, ttft in ttfts]
    follow_ups = [ttft for turn, ttft in ttfts if turn > 0]
    evaluated = [prompt - used for prompt, used in reuse]
    return {
        "requests": len(ttfts),
        "ttft_p50_ms": round(statistics.median(every) * 1000, 1),
        "ttft_p90_ms": round(p90(every) * 1000, 1),
        "follow_up_ttft_p50_ms": round(statistics.median(follow_ups) * 1000, 1),
        "prompt_tokens": sum(prompt for prompt, _ in reuse),
        "prompt_tokens_evaluated": sum(evaluated),
        "prompt_tokens_evaluated_p50": statistics.median(evaluated) if evaluated else None,
        "cache_reuse_fraction": round(1 - sum(evaluated) / max(1, sum(p for p, _ in reuse)), 3),
    }


def bench_prefix_affinity(
    work: Path, rounds: int, users: int, turns: int, think: tuple[float, float], stagger: float, prompts: int = 4
) -> Result:
    store = ollama_model.prepare()
    result: Result = {"rounds": rounds, "users": users, "turns": turns, "system_prompts": prompts,
                      "think_seconds": list(think), "stagger_seconds": stagger,
                      "replicas": 2, "parallel_per_replica": PARALLEL}  # fmt: skip
    phases: dict[str, list[tuple[list[tuple[int, float]], list[tuple[int, int]]]]] = {mode: [] for mode in MODES}
    with (
        ollama_model.serve(ollama_model.link_copy(store, work / "affinity-a"), work / "affinity-ollama-a",
                           parallel=PARALLEL, debug=True) as first,
        ollama_model.serve(ollama_model.link_copy(store, work / "affinity-b"), work / "affinity-ollama-b",
                           parallel=PARALLEL, debug=True) as second,
    ):  # fmt: skip
        replicas = (first, second)
        for replica in replicas:
            create = {"model": BENCH_MODEL, "from": ollama_model.MODEL_NAME, "parameters": {"num_thread": 1},
                      "stream": False}  # fmt: skip
            ollama_model.http_json(f"{replica.base_url}/api/create", create)
            first_token(replica.base_url, [{"role": "user", "content": "hi"}], 2, model=BENCH_MODEL)  # loads it
        model = {"replica_urls": [second.base_url], "max_in_flight": PARALLEL, "cache_enabled": False}
        for round_ in range(rounds):
            for index, mode in enumerate(MODES):
                seed = 100 * round_ + index
                openings = conversations(seed, prompts=prompts, count=users)
                marks = [line_count(replica.log_path) for replica in replicas]
                with router(work, first.base_url, upstream_model=BENCH_MODEL, model_settings={**model, "routing": mode},
                            cache_size="0") as (base, _):  # fmt: skip
                    ttfts = run_phase(base, openings, turns, seed, think, stagger)
                reuse = [row for replica, mark in zip(replicas, marks, strict=True)
                         for row in cache_reuse(replica.log_path, mark)]  # fmt: skip
                phases[mode].append((ttfts, reuse))
                log(f"prefix affinity round {round_} {mode}: {summarise(ttfts, reuse)}")
    for mode in MODES:
        result[mode] = summarise([t for ttfts, _ in phases[mode] for t in ttfts],
                                 [r for _, reuse in phases[mode] for r in reuse])  # fmt: skip
    for stat in ("ttft_p50", "ttft_p90", "follow_up_ttft_p50"):
        result[f"{stat}_ratio"] = round(result["leastLoaded"][f"{stat}_ms"] / result["prefix"][f"{stat}_ms"], 2)
    return result


# vLLM's own counters of its prefix cache, in prompt tokens.
PREFIX_QUERIES = re.compile(r"^vllm:prefix_cache_queries_total\{[^}]*\} ([0-9.e+]+)$", re.M)
PREFIX_HITS = re.compile(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def vllm_prefix_counters(base_url: str) -> tuple[float, float]:
    """(prompt tokens looked up in the prefix cache, tokens found there) since the server started."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return (sum(float(m) for m in PREFIX_QUERIES.findall(text)), sum(float(m) for m in PREFIX_HITS.findall(text)))


def vllm_replica(work: Path, name: str, core: int) -> Any:
    """One vLLM CPU server of the converted Gemma on 127.0.0.1, its OpenMP threads on `core` only."""
    from hack import vllm_model  # the vLLM venv is needed only here

    python = vllm_model.VLLM_PYTHON
    if not python.exists():
        raise RuntimeError(f"{python} is missing: `make install-vllm`")
    model = vllm_model.converted_model()
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", BENCH_MODEL, "--host", LOOPBACK, "--port", str(port), "--dtype", "float32",
            "--max-model-len", "4096", "--enforce-eager", "--max-num-seqs", str(PARALLEL)]  # fmt: skip
    base = f"http://{LOOPBACK}:{port}"
    return running(name, argv, work, lambda: http_ok(f"{base}/health"), env=env, timeout=600, cpus=str(core)), base


def bench_prefix_affinity_vllm(
    work: Path, rounds: int, users: int, turns: int, think: tuple[float, float], stagger: float, prompts: int = 4
) -> Result:
    """The same support desk on two vLLM CPU replicas, one core each. vLLM's prefix cache is paged and
    holds thousands of tokens; its own counters say how many prompt tokens each mode found there."""
    result: Result = {"engine": "vllm", "rounds": rounds, "users": users, "turns": turns, "system_prompts": prompts,
                      "think_seconds": list(think), "stagger_seconds": stagger,
                      "replicas": 2, "parallel_per_replica": PARALLEL}  # fmt: skip
    phases: dict[str, list[tuple[list[tuple[int, float]], tuple[float, float]]]] = {mode: [] for mode in MODES}
    (first_server, first_url), (second_server, second_url) = vllm_replica(work, "vllm-a", 0), vllm_replica(
        work, "vllm-b", 1)  # fmt: skip
    with first_server, second_server:
        urls = (first_url, second_url)
        for url in urls:
            first_token(url, [{"role": "user", "content": "hi"}], 2, model=BENCH_MODEL)
        model = {"replica_urls": [second_url], "max_in_flight": PARALLEL, "cache_enabled": False}
        for round_ in range(rounds):
            for index, mode in enumerate(MODES):
                seed = 100 * round_ + index + 50
                openings = conversations(seed, prompts=prompts, count=users)
                before = [vllm_prefix_counters(url) for url in urls]
                with router(work, first_url, upstream_model=BENCH_MODEL, model_settings={**model, "routing": mode},
                            cache_size="0") as (base, _):  # fmt: skip
                    ttfts = run_phase(base, openings, turns, seed, think, stagger)
                after = [vllm_prefix_counters(url) for url in urls]
                counted = (sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
                           sum(a[1] - b[1] for a, b in zip(after, before, strict=True)))  # fmt: skip
                phases[mode].append((ttfts, counted))
                log(f"prefix affinity on vLLM round {round_} {mode}: {summarise_vllm(ttfts, [counted])}")
    for mode in MODES:
        result[mode] = summarise_vllm([t for ttfts, _ in phases[mode] for t in ttfts],
                                      [counted for _, counted in phases[mode]])  # fmt: skip
    for stat in ("ttft_p50", "ttft_p90", "follow_up_ttft_p50"):
        result[f"{stat}_ratio"] = round(result["leastLoaded"][f"{stat}_ms"] / result["prefix"][f"{stat}_ms"], 2)
    return result


def summarise_vllm(ttfts: list[tuple[int, float]], counted: list[tuple[float, float]]) -> Result:
    every = [ttft for _, ttft in ttfts]
    follow_ups = [ttft for turn, ttft in ttfts if turn > 0]
    queries, hits = sum(q for q, _ in counted), sum(h for _, h in counted)
    return {
        "requests": len(ttfts),
        "ttft_p50_ms": round(statistics.median(every) * 1000, 1),
        "ttft_p90_ms": round(p90(every) * 1000, 1),
        "follow_up_ttft_p50_ms": round(statistics.median(follow_ups) * 1000, 1),
        "prompt_tokens": int(queries),
        "prompt_tokens_evaluated": int(queries - hits),
        "cache_reuse_fraction": round(hits / max(1.0, queries), 3),
    }


def rows(result: dict[str, Any]) -> list[str]:
    """The markdown table of a `prefix_affinity` result."""
    think = "-".join(f"{seconds:g}" for seconds in result["think_seconds"])
    engine = "vLLM" if result.get("engine") == "vllm" else "Ollama"
    lines = [f"| routing on {engine} ({result['users']} users x {result['turns']} turns, {think} s between turns, "
             f"{result['rounds']} rounds) | TTFT p50 ms "
             "| TTFT p90 ms | follow-up TTFT p50 ms | prompt tokens evaluated | of prompt tokens | cache reuse |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode in MODES:
        row = result[mode]
        lines.append(f"| {mode} | {row['ttft_p50_ms']:,} | {row['ttft_p90_ms']:,} | {row['follow_up_ttft_p50_ms']:,} "
                     f"| {row['prompt_tokens_evaluated']:,} | {row['prompt_tokens']:,} "
                     f"| {row['cache_reuse_fraction']:.1%} |")  # fmt: skip
    lines.append(f"\nTTFT ratios (least-loaded / prefix): p50 **{result['ttft_p50_ratio']}**, "
                 f"p90 {result['ttft_p90_ratio']}, follow-up p50 {result['follow_up_ttft_p50_ratio']}")  # fmt: skip
    return lines
