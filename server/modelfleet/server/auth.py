"""API keys: loaded from a file (a mounted Secret), held only as SHA-256 digests, checked in constant time.

A key file is YAML or JSON:

    keys:
      - name: team-a                      # shown in logs and limits; never the key itself
        sha256: 9f86d081...               # hex digest of the key (preferred: the file holds no secret)
        requests_per_minute: 600          # optional, overrides the model's and the router's default
        tokens_per_minute: 200000
      - name: ops
        key: "plain text key"             # accepted, hashed at load and dropped
        admin: true                       # admin keys open /v1/admin/*

The file is re-read when it changes, so a rotated Secret takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from starlette.requests import Request

from modelfleet.server.errors import ADMIN_REQUIRED, INVALID_API_KEY, MISSING_API_KEY
from modelfleet.server.queue import Priority

logger = logging.getLogger(__name__)


class KeyEntry(BaseModel):
    name: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key: SecretStr | None = None
    admin: bool = False
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    # Its share of a busy model's slots against other keys (fair queueing), and its highest priority.
    weight: float = Field(1.0, gt=0, le=1000)
    priority: Priority = "interactive"

    @model_validator(mode="after")
    def one_secret(self) -> KeyEntry:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError(f"key {self.name!r}: give exactly one of sha256 and key")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


class KeyFile(BaseModel):
    keys: list[KeyEntry] = Field(default_factory=list)


# Where the generation routes (hotpath.py) keep the caller they authenticated before reading the body,
# so that admission does not look the key up again.
PRINCIPAL_STATE = "principal"


def authenticated(request: Request, keys: KeyRing) -> Principal:
    """The caller HotRoutes already named for this request, else the key ring's answer now."""
    known = getattr(request.state, PRINCIPAL_STATE, None)
    return known if isinstance(known, Principal) else keys.authenticate(request)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named key, or an anonymous client identified by its address."""

    name: str
    subject: str  # what rate limits count against: "key:<name>" or "ip:<address>"
    admin: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    anonymous: bool = False
    weight: float = 1.0
    priority: Priority = "interactive"


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


class KeyRing:
    def __init__(self, path: Path | None, required: bool, reload_interval_seconds: float = 5.0) -> None:
        self.path = path
        self.required = required
        self.reload_interval_seconds = reload_interval_seconds
        self._by_digest: dict[bytes, KeyEntry] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        if path is not None:
            self._load()
        if required and not self._by_digest:
            logger.warning(
                "API keys are required but none are configured: every request will be refused "
                "(set MODELFLEET_API_KEYS_FILE, or MODELFLEET_AUTH_REQUIRED=false for local use)"
            )

    def __len__(self) -> int:
        return len(self._by_digest)

    def _load(self) -> None:
        assert self.path is not None
        document = yaml.safe_load(self.path.read_text()) or {}
        entries = KeyFile.model_validate(document).keys
        # Only digests stay in memory: a plain-text key from the file is hashed and dropped here.
        self._by_digest = {
            entry.digest(): entry.model_copy(update={"key": None, "sha256": entry.digest().hex()}) for entry in entries
        }
        self._mtime = self.path.stat().st_mtime
        logger.info("loaded %d API keys (%d admin)", len(entries), sum(entry.admin for entry in entries))

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.reload_interval_seconds:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime != self._mtime:
                self._load()
        except (OSError, ValueError, yaml.YAMLError) as exc:
            # A half-written or mistyped Secret must not lock every client out (nor answer 500s):
            # the keys that worked keep working, and the next change is tried again.
            logger.error("cannot reload the API key file, keeping the previous keys: %s", exc)

    def lookup(self, key: str) -> KeyEntry | None:
        digest = hashlib.sha256(key.encode()).digest()
        # The dict is keyed by digest, so timing reveals nothing about the key itself; the final
        # comparison is constant-time anyway.
        entry = self._by_digest.get(digest)
        if entry is None:
            return None
        return entry if hmac.compare_digest(digest, entry.digest()) else None

    def authenticate(self, request: Request) -> Principal:
        self._reload_if_changed()
        key = presented_key(request)
        if key is not None:
            entry = self.lookup(key)
            if entry is None and not self.required:
                # With auth off, clients (the openai SDK among them) still send some key.
                return self.anonymous(request)
            if entry is None:
                raise INVALID_API_KEY("Incorrect API key provided.")
            return Principal(
                name=entry.name,
                subject=f"key:{entry.name}",
                admin=entry.admin,
                requests_per_minute=entry.requests_per_minute,
                tokens_per_minute=entry.tokens_per_minute,
                weight=entry.weight,
                priority=entry.priority,
            )
        if self.required:
            raise MISSING_API_KEY("No API key provided: send `Authorization: Bearer <key>` or `X-API-Key: <key>`.")
        return self.anonymous(request)

    @staticmethod
    def anonymous(request: Request) -> Principal:
        address = request.client.host if request.client else "unknown"
        return Principal(name="anonymous", subject=f"ip:{address}", anonymous=True)

    def require_admin(self, request: Request) -> Principal:
        if presented_key(request) is None:
            raise MISSING_API_KEY("This endpoint requires an admin API key.")
        principal = self.authenticate(request)
        if not principal.admin:
            raise ADMIN_REQUIRED("This endpoint requires an admin API key.")
        return principal
