"""The scope of `make mutation` and its report: per module, mutants killed, survived and the surviving share.

mutmut runs in .mutation/, a copy of the repository where both source roots are merged under src/ (see
[tool.mutmut] in pyproject.toml).  It mutates whole files; the pure core is narrower than some of them, so:

    python hack/mutation_report.py patterns   # the mutant names in scope, as globs for `mutmut run`
    python hack/mutation_report.py report     # the table, from the results mutmut left in .mutation/mutants

The report also writes the surviving mutants, one per line, to .mutation/survivors.txt (`mutmut show NAME`
in .mutation/ shows one's diff).  A mutant with no test that reaches it counts as surviving.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKDIR = REPO / ".mutation"

# The pure core, by module and its file in the repository.
MODULES: dict[str, str] = {
    "modelfleet.server.routing": "server/modelfleet/server/routing.py",
    "modelfleet.server.queue": "server/modelfleet/server/queue.py",
    "modelfleet.server.ratelimit": "server/modelfleet/server/ratelimit.py",
    "modelfleet.server.cache": "server/modelfleet/server/cache.py",
    "modelfleet.operator.builders.autoscaling": "operator/modelfleet/operator/builders/autoscaling.py",
    "modelfleet.operator.builders.cache": "operator/modelfleet/operator/builders/cache.py",
    "modelfleet.operator.builders.common": "operator/modelfleet/operator/builders/common.py",
    "modelfleet.operator.builders.networkpolicy": "operator/modelfleet/operator/builders/networkpolicy.py",
    "modelfleet.operator.builders.service": "operator/modelfleet/operator/builders/service.py",
    "modelfleet.operator.builders.workload": "operator/modelfleet/operator/builders/workload.py",
}

# Functions of those modules left out, as globs over "Class.method" or "function", each with its reason.
EXCLUDED: dict[str, dict[str, str]] = {
    "modelfleet.server.ratelimit": {
        "RedisRateLimiter.__init__": "registers the Lua scripts with a Redis client",
        "RedisRateLimiter.acquire": "runs ACQUIRE_LUA in Redis (the integration tests run it against a real Redis)",
        "RedisRateLimiter.settle": "runs SETTLE_LUA in Redis",
        "RedisRateLimiter.charge_tokens": "runs CHARGE_LUA in Redis",
        "RedisRateLimiter._member_id": "a member id of the Redis sorted sets",
        "RedisRateLimiter._failed": "logging of a Redis outage",
        "RedisRateLimiter._succeeded": "logging of a Redis recovery",
        "_window_us": "the window as the Redis scripts take it",
    },
    "modelfleet.server.cache": {
        "MemoryStore.*": "storage, not keys: a thin wrapper of cachetools.TLRUCache",
        "RedisStore.*": "storage in Redis",
        "RedisCircuit.*": "Redis health",
        "ResponseCache.*": "coalescing and counters around the store, not the key rules",
    },
}

# mutmut's exit codes per verdict (mutmut/stats.py).
KILLED: dict[int | None, str] = {
    1: "killed",
    3: "killed",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "caught by type check",
    -11: "segfault",
    -9: "segfault",
}
NOT_RUN: dict[int | None, str] = {None: "not checked", 2: "interrupted", 34: "skipped"}
SURVIVED: dict[int | None, str] = {0: "survived", 5: "no tests", 33: "no tests", 35: "suspicious"}

CLASS_SEPARATOR = "\N{LATIN LETTER LATERAL CLICK}"  # how mutmut mangles Class.method into a name: xǁClassǁmethod


def functions(path: Path) -> Iterator[str]:
    """The module-level functions ("name") and methods ("Class.name") of a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}"


def mangled(function: str) -> str:
    """mutmut's name of a function: x_name, or xǁClassǁname for a method."""
    if "." in function:
        cls, _, name = function.partition(".")
        return f"x{CLASS_SEPARATOR}{cls}{CLASS_SEPARATOR}{name}"
    return f"x_{function}"


def unmangled(mutant: str) -> str:
    """The function ("name" or "Class.name") a mutant's key belongs to."""
    name = mutant.rpartition("__mutmut_")[0].rpartition(".")[2]
    if name.startswith(f"x{CLASS_SEPARATOR}"):
        _, cls, method = name.split(CLASS_SEPARATOR, 2)
        return f"{cls}.{method}"
    return name.removeprefix("x_")


def excluded(module: str, function: str) -> bool:
    return any(fnmatch.fnmatchcase(function, pattern) for pattern in EXCLUDED.get(module, {}))


def patterns() -> list[str]:
    """A glob of mutant names per function in scope, for `mutmut run`."""
    found = []
    for module, path in MODULES.items():
        for function in functions(REPO / path):
            if not excluded(module, function):
                found.append(f"{module}.{mangled(function)}__mutmut_*")
    return found


@dataclass
class Tally:
    killed: int = 0
    survived: int = 0
    not_run: int = 0

    @property
    def total(self) -> int:
        return self.killed + self.survived

    @property
    def surviving_percent(self) -> float:
        return 100 * self.survived / self.total if self.total else 0.0


def results(mutants_dir: Path, module: str, path: str) -> dict[str, int | None]:
    """mutmut's exit code per mutant of `module` in scope, from the .meta file it keeps beside the mutated copy."""
    relative = Path(path).relative_to(path.split("/", 1)[0])  # server/modelfleet/... -> modelfleet/...
    meta = mutants_dir / "src" / f"{relative}.meta"
    if not meta.is_file():
        raise SystemExit(f"{meta} is missing: run `make mutation` first")
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: code for name, code in codes.items() if not excluded(module, unmangled(name))}


def report(mutants_dir: Path, survivors_file: Path) -> int:
    tallies: dict[str, Tally] = {}
    survivors: list[str] = []
    for module, path in MODULES.items():
        tally = tallies[path] = Tally()
        for name, code in sorted(results(mutants_dir, module, path).items()):
            if code in KILLED:
                tally.killed += 1
            elif code in NOT_RUN:
                tally.not_run += 1
            else:
                tally.survived += 1
                survivors.append(f"{name}  {SURVIVED.get(code, f'exit code {code}')}")
    survivors_file.write_text("".join(f"{line}\n" for line in survivors))
    for line in survivors:
        print(line)
    print(f"\n{len(survivors)} surviving mutants, listed in {survivors_file}; "
          "`cd .mutation && ../.venv/bin/mutmut show NAME` shows one.\n")  # fmt: skip
    width = max(len(path) for path in tallies)
    print(f"{'module':<{width}}  {'killed':>6}  {'survived':>8}  {'total':>5}  {'surviving':>9}")
    for path, tally in tallies.items():
        not_run = f"  ({tally.not_run} not run)" if tally.not_run else ""
        print(f"{path:<{width}}  {tally.killed:>6}  {tally.survived:>8}  {tally.total:>5}  "
              f"{tally.surviving_percent:>8.1f}%{not_run}")  # fmt: skip
    overall = Tally(sum(t.killed for t in tallies.values()), sum(t.survived for t in tallies.values()))
    print(f"{'all':<{width}}  {overall.killed:>6}  {overall.survived:>8}  {overall.total:>5}  "
          f"{overall.surviving_percent:>8.1f}%")  # fmt: skip
    print("\nLeft out of the pure core:")
    for module, reasons in EXCLUDED.items():
        for function, reason in reasons.items():
            print(f"  {module}.{function}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["patterns", "report"])
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="where mutmut ran (default: .mutation)")
    args = parser.parse_args(argv)
    if args.command == "patterns":
        print("\n".join(patterns()))
        return 0
    return report(args.workdir / "mutants", args.workdir / "survivors.txt")


if __name__ == "__main__":
    sys.exit(main())
