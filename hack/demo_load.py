"""`make demo-load`: load the demo's model until the HPA scales it to 2 replicas, then watch it go back to 1.

After `make demo` (which writes .cache/demo/env and declares the model `gemma` in namespace `demo` with
autoscaling from 1 to 2 replicas on the router's queue depth, see hack/demo.sh), this sends streamed chats
through the router from a few concurrent clients, each with a new prompt (a cached answer never reaches
the queue). Once the model's second replica is Ready it stops sending and waits for the HPA to bring the
model back to 1. A live view shows, about once a second, what the HPA reads (the External metric
modelfleet_queue_depth that prometheus-adapter serves from Prometheus), the HPA's desired replicas and
the Deployment's ready ones, and the load's own counts. It rewrites its lines on a terminal and prints
one plain line a second otherwise.

Bounded: at most --max-requests requests and --timeout seconds overall; past the bound it exits 1 and
prints the last samples it saw.

    .venv/bin/python -m hack.demo_load [--workers 6] [--max-requests 400] [--timeout 480]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / ".cache" / "demo" / "env"
KUBECONFIG = REPO / ".cache" / "kubeconfig"
NAMESPACE = "demo"  # hack/demo.sh's models_namespace
RATE_WINDOW = 10.0  # seconds of answers the request rate is averaged over
TAIL = 12  # samples printed when the bound passes

CSI = "\x1b["


# The pure parts: the env file, the metric's quantities, the phases and the view ---------------------


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as hack/demo.sh writes .cache/demo/env."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def quantity(text: str) -> float:
    """A Kubernetes quantity as the metrics APIs write it: "4", "1500m"."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def answer_rate(ended: Sequence[float], now: float, window: float = RATE_WINDOW) -> float:
    """Answers per second over the last `window` seconds."""
    return sum(1 for moment in ended if now - window < moment <= now) / window


class Phase(enum.StrEnum):
    SETTLE = "waiting for the model to be at 1 replica before loading it"
    LOAD = "sending: waiting for a 2nd Ready replica"
    DRAIN = "stopped sending: waiting for the HPA to bring it back to 1"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Sample:
    """One look, `t` seconds after the start: the pipeline's figures and the load's counts."""

    t: float
    queue: float | None  # the External metric the HPA reads; None while the adapter has no series
    desired: int | None  # the HPA's desired replicas
    replicas: int | None  # the Deployment's spec.replicas
    ready: int  # the Deployment's ready replicas
    in_flight: int = 0
    answered: int = 0
    failed: int = 0
    rate: float = 0.0

    def at(self, count: int) -> bool:
        """The model has settled at `count` replicas: the HPA wants them, the Deployment has them Ready."""
        return self.desired == count and self.replicas == count and self.ready == count


@dataclass
class Progress:
    """The phases, from the samples alone: load until the second replica is Ready, then wait for 1 again."""

    timeout: float
    phase: Phase = Phase.SETTLE
    load_started: float | None = None
    decided_up: float | None = None  # the HPA first wanted 2
    scaled_up: float | None = None  # the second replica was Ready
    back_to_one: float | None = None
    reason: str = ""

    def advance(self, sample: Sample, *, load_exhausted: bool = False) -> Phase:
        if self.phase is Phase.SETTLE and sample.at(1):
            self.phase, self.load_started = Phase.LOAD, sample.t
        if self.phase is Phase.LOAD:
            if self.decided_up is None and (sample.desired or 0) >= 2:
                self.decided_up = sample.t
            if sample.ready >= 2:
                self.phase, self.scaled_up = Phase.DRAIN, sample.t
            elif load_exhausted:
                self.phase, self.reason = Phase.FAILED, "every request was sent and answered before a 2nd replica"
        if self.phase is Phase.DRAIN and sample.at(1) and sample.in_flight == 0:
            self.phase, self.back_to_one = Phase.DONE, sample.t
        if self.phase not in (Phase.DONE, Phase.FAILED) and sample.t >= self.timeout:
            self.phase, self.reason = Phase.FAILED, f"still {self.phase.value!r} after {self.timeout:.0f} s"
        return self.phase

    def figures(self) -> list[str]:
        """What the run measured, as far as it got."""

        def since(moment: float | None, origin: float | None) -> str:
            return "-" if moment is None or origin is None else f"{moment - origin:.1f} s"

        return [
            f"load to the HPA's decision for 2 replicas: {since(self.decided_up, self.load_started)}",
            f"load to 2 Ready replicas:                  {since(self.scaled_up, self.load_started)}",
            f"load stopped to back at 1 replica:         {since(self.back_to_one, self.scaled_up)}",
        ]


def _number(value: float | int | None, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def view_lines(sample: Sample, phase: Phase) -> list[str]:
    """The live view: three lines, rewritten in place on a terminal."""
    return [
        f"[{sample.t:5.0f} s] {phase.value}",
        f"  queue depth {_number(sample.queue):>4} (what the HPA reads)   replicas: desired "
        f"{_number(sample.desired)}, ready {sample.ready}",
        f"  requests {sample.rate:4.1f}/s   in flight {sample.in_flight}   answered {sample.answered}   "
        f"failed {sample.failed}",
    ]


def plain_line(sample: Sample, phase: Phase) -> str:
    """One line a sample, for a log or a pipe."""
    return (
        f"t={sample.t:.0f}s phase={phase.name.lower()} queue={_number(sample.queue)} "
        f"desired={_number(sample.desired)} ready={sample.ready} rate={sample.rate:.1f}/s "
        f"in_flight={sample.in_flight} answered={sample.answered} failed={sample.failed}"
    )


def redraw(lines: Sequence[str], drawn: int) -> str:
    """The text that replaces the `drawn` lines last written (cursor back up, each line cleared) with `lines`."""
    up = f"{CSI}{drawn}F" if drawn else ""
    return up + "".join(f"{line}{CSI}K\n" for line in lines)


class View:
    """The live view on a terminal, or plain lines."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty, self.drawn = out, tty, 0

    def show(self, sample: Sample, phase: Phase) -> None:
        if self.tty:
            lines = view_lines(sample, phase)
            self.out.write(redraw(lines, self.drawn))
            self.drawn = len(lines)
        else:
            self.out.write(plain_line(sample, phase) + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        """A line that stays, above the live view (which the next show draws again below it)."""
        if self.tty:
            self.out.write(redraw([text], self.drawn))  # each line cleared: it may land on the old view's
            self.drawn = 0
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """Keep the view as it last was: what comes next is written below it."""
        self.drawn = 0


# The cluster --------------------------------------------------------------------------------------


class Pipeline:
    """Reads what the HPA reads and what it did: the External metric, the HPA and the Deployment."""

    def __init__(self, model: str, namespace: str = NAMESPACE) -> None:
        api = config.new_client_from_config(config_file=str(KUBECONFIG))  # type: ignore[no-untyped-call]
        self.model, self.namespace = model, namespace
        self.name = f"im-{model}"
        self.autoscaling = client.AutoscalingV2Api(api)
        self.apps = client.AppsV1Api(api)
        # /apis/external.metrics.k8s.io/v1beta1/namespaces/<ns>/<metric>: a custom object's list path.
        self.objects = client.CustomObjectsApi(api)

    def queue_depth(self) -> float | None:
        try:
            result: Any = self.objects.list_namespaced_custom_object(
                "external.metrics.k8s.io", "v1beta1", self.namespace, "modelfleet_queue_depth",
                label_selector=f"model={self.model},namespace={self.namespace}", _request_timeout=5,
            )  # fmt: skip
        except ApiException:
            return None
        items = result.get("items") or []
        return sum(quantity(item["value"]) for item in items) if items else None

    def look(self, t: float) -> Sample:
        hpa: Any = self.autoscaling.read_namespaced_horizontal_pod_autoscaler(
            self.name, self.namespace, _request_timeout=5
        )
        deployment: Any = self.apps.read_namespaced_deployment(self.name, self.namespace, _request_timeout=5)
        return Sample(
            t=t,
            queue=self.queue_depth(),
            desired=hpa.status.desired_replicas,
            replicas=deployment.spec.replicas,
            ready=deployment.status.ready_replicas or 0,
        )


# The load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    """`workers` clients streaming chats one after another until stopped or `max_requests` are sent."""

    router_url: str
    api_key: str
    model: str
    workers: int
    max_requests: int
    max_tokens: int
    sent: int = 0
    in_flight: int = 0
    answered: int = 0
    failed: int = 0
    ended: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    last_error: str = ""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def exhausted(self) -> bool:
        return self.sent >= self.max_requests and self.in_flight == 0

    async def run(self) -> None:
        timeout = httpx.Timeout(120, connect=10)
        async with httpx.AsyncClient(base_url=self.router_url, timeout=timeout) as http:
            await asyncio.gather(*(self._worker(http, index) for index in range(self.workers)))

    async def _worker(self, http: httpx.AsyncClient, index: int) -> None:
        while not self.stop.is_set() and self.sent < self.max_requests:
            self.sent += 1
            self.in_flight += 1
            try:
                ok = await self._chat(http, f"Request {self.sent} from client {index}: name a colour and a bird.")
            finally:
                self.in_flight -= 1
            if ok:
                self.answered += 1
                self.ended.append(time.monotonic())
            else:
                self.failed += 1

    async def _chat(self, http: httpx.AsyncClient, prompt: str) -> bool:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        tokens = 0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                if response.status_code != 200:
                    self.last_error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return False
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue  # `: ping` heartbeats while queued, blank separators
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        self.last_error = json.dumps(event["error"])[:200]
                        return False
                    tokens += 1
        except httpx.HTTPError as exc:
            self.last_error = repr(exc)[:200]
            return False
        if not tokens:
            self.last_error = "a stream ended without a chunk"
        return tokens > 0


# The run ------------------------------------------------------------------------------------------


async def drive(pipeline: Pipeline, load: Load, progress: Progress, view: View) -> list[tuple[Sample, Phase]]:
    """Look once a second, advance the phases, start and stop the load; the samples seen, with their phases."""
    origin = time.monotonic()
    samples: list[tuple[Sample, Phase]] = []
    sender: asyncio.Task[None] | None = None
    phase = progress.phase
    try:
        while phase not in (Phase.DONE, Phase.FAILED):
            tick = time.monotonic()
            seen = await asyncio.to_thread(pipeline.look, round(tick - origin, 1))
            sample = dataclasses.replace(seen, in_flight=load.in_flight, answered=load.answered, failed=load.failed,
                                         rate=answer_rate(load.ended, tick))  # fmt: skip
            phase = progress.advance(sample, load_exhausted=sender is not None and load.exhausted)
            samples.append((sample, phase))
            if phase is Phase.LOAD and sender is None:
                view.note(f"[{sample.t:5.0f} s] at 1 replica: {load.workers} clients start sending")
                sender = asyncio.create_task(load.run())
            elif phase is not Phase.LOAD and sender is not None and not load.stop.is_set():
                load.stop.set()
                view.note(f"[{sample.t:5.0f} s] {sample.ready} replicas Ready: the clients stop sending")
            view.show(sample, phase)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    finally:
        load.stop.set()
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hack.demo_load", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6, help="concurrent streaming clients (default 6)")
    parser.add_argument("--max-requests", type=int, default=400, help="requests sent at most (default 400)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default 32)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds for the whole run (default 480)")
    args = parser.parse_args(argv)
    if not ENV_FILE.exists():
        print(f"demo-load: {ENV_FILE.relative_to(REPO)} is missing; run `make demo` first", file=sys.stderr)
        return 2
    env = parse_env(ENV_FILE.read_text())
    pipeline = Pipeline(env["MODEL"])
    try:
        first = pipeline.look(0)
    except ApiException as exc:
        if exc.status != 404:
            raise
        print(f"demo-load: the model {env['MODEL']} in {NAMESPACE} has no HPA {pipeline.name}: its "
              "spec.autoscaling is off (hack/demo.sh declares it; run `make demo` again)", file=sys.stderr)  # fmt: skip
        return 2
    load = Load(env["ROUTER_URL"], env["API_KEY"], env["MODEL"], args.workers, args.max_requests, args.max_tokens)
    progress = Progress(timeout=args.timeout)
    view = View(sys.stdout, sys.stdout.isatty())
    view.note(
        f"demo-load: {env['MODEL']} in {NAMESPACE} through {env['ROUTER_URL']}, now at {first.ready} Ready "
        f"replica(s); up to {args.max_requests} requests from {args.workers} clients, {args.timeout:.0f} s at most"
    )
    samples = asyncio.run(drive(pipeline, load, progress, view))
    view.close()
    for line in progress.figures():
        view.note(line)
    view.note(f"requests: {load.sent} sent, {load.answered} answered, {load.failed} failed")
    if progress.phase is Phase.DONE:
        return 0
    print(f"demo-load: FAILED: {progress.reason}", file=sys.stderr)
    if load.last_error:
        print(f"the last failed request: {load.last_error}", file=sys.stderr)
    print("the last samples:", file=sys.stderr)
    for sample, phase in samples[-TAIL:]:
        print("  " + plain_line(sample, phase), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
