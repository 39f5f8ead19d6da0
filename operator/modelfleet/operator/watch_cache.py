"""The children as the watch has seen them: what a resync reads instead of the API server, and what tells
an apply that would change nothing from one that would."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]

ChildKey = tuple[str, str, str]  # (kind, namespace, name)


def manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def holds(live: Any, desired: Any) -> bool:
    """Whether every field of `desired` is in `live` with the same value (lists item by item).

    Fields only `live` has (defaults, status, other managers' fields) do not matter: an apply would
    leave them as they are.  A field missing from `live` holds a zero value (false, 0, "", empty):
    the API server leaves zero values out of what it stores (Go's omitempty).
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            holds(live[key], value) if key in live else not value for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(holds(item, wanted) for item, wanted in zip(live, desired, strict=True)))  # fmt: skip
    return bool(live == desired)


@dataclass
class WatchCache:
    """The operator's informer cache: the newest version of each child that the watch has seen, and what
    the operator last applied to it (as controller-runtime's cache serves a reconcile's reads).

    An apply is skipped when the desired manifest is the one applied last time and the object still
    matches it: either nothing changed it since (the watch's newest resourceVersion is the one that
    apply returned), or only fields the operator does not set changed (status, most often).  The API
    server would merge such an apply into the same object.  Any doubt (an unknown child, an event not
    seen yet, an operator restart, a value the API server stores in another form) sends the apply.
    Drift still comes back within a second: the change that causes it is a watch event, which both
    shows the difference and triggers the reconcile.
    """

    _applied: dict[ChildKey, tuple[str, str]] = field(default_factory=dict)  # digest, resourceVersion
    _seen: dict[ChildKey, Manifest] = field(default_factory=dict)
    # Children deleted (or found missing) by the operator, and not seen again since: deleting them
    # again would only earn a 404.
    _absent: set[ChildKey] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key(body: Manifest) -> ChildKey:
        meta = body.get("metadata") or {}
        return (str(body.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))

    def observe(self, body: Manifest, deleted: bool = False) -> None:
        """A watch event of a child."""
        key = self.key(body)
        with self._lock:
            if deleted:
                self._seen.pop(key, None)
                # Only what the operator applies comes back under the same name; a pod's name never
                # does, and remembering every deleted pod would grow without end.
                if self._applied.pop(key, None) is not None:
                    self._absent.add(key)
            else:
                self._seen[key] = body
                self._absent.discard(key)

    def seen(self, kind: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._seen.get((kind, namespace, name))

    def seen_matching(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Manifest]:
        with self._lock:
            candidates = [body for (k, ns, _), body in self._seen.items() if k == kind and ns == namespace]
        return [
            body
            for body in candidates
            if all(
                ((body.get("metadata") or {}).get("labels") or {}).get(key) == value for key, value in labels.items()
            )
        ]

    def absent(self, key: ChildKey) -> bool:
        with self._lock:
            return key in self._absent

    def gone(self, key: ChildKey) -> None:
        """The operator deleted the child, or the API server said it does not exist."""
        with self._lock:
            self._seen.pop(key, None)
            self._applied.pop(key, None)
            self._absent.add(key)

    def unchanged(self, manifest: Manifest) -> Manifest | None:
        """The live object, if applying `manifest` now would change nothing; else None."""
        key = self.key(manifest)
        with self._lock:
            applied, seen = self._applied.get(key), self._seen.get(key)
        if applied is None or seen is None:
            return None
        digest, applied_version = applied
        if digest != manifest_digest(manifest):
            return None
        if (seen.get("metadata") or {}).get("resourceVersion") == applied_version or holds(seen, manifest):
            return seen
        return None

    def record(self, manifest: Manifest, live: Manifest) -> None:
        """An apply of `manifest` returned `live`."""
        key = self.key(manifest)
        version = str((live.get("metadata") or {}).get("resourceVersion", ""))
        with self._lock:
            self._applied[key] = (manifest_digest(manifest), version)
            self._seen[key] = live
            self._absent.discard(key)
