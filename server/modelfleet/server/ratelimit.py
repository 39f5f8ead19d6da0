"""Per-subject rate limits on requests and tokens per window, in process or shared through Redis.

Both limiters keep an exact sliding log: every admitted request and every token charge is stored
with its time and leaves the window `window_seconds` later.  A request is admitted only while the
log of the last window is below the limit, so no span of `window_seconds` ever holds more than the
limit, not even across the edge of a fixed window (a fixed window, or a token bucket as large as the
limit, lets 2x through there).  The price is memory proportional to the traffic of one window.

Token counts are known only once a response ends.  So a request *reserves* its most (its prompt's
estimate plus max_tokens) when it is admitted, and is admitted only if that fits in what is left of
the budget; `settle` then replaces the reservation by the real count, which refunds the rest.  One
large request can no longer overshoot the budget.  `charge_tokens` records a count with no
reservation (the budget then refuses the *next* request once the window's sum reaches the limit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from redis.exceptions import RedisError

if TYPE_CHECKING:
    import redis.asyncio

logger = logging.getLogger(__name__)

Dimension = Literal["requests", "tokens"]


@dataclass(frozen=True)
class Limits:
    requests: int | None  # per window; None = unlimited
    tokens: int | None  # prompt+completion tokens per window; None = unlimited
    window_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name, value in (("requests", self.requests), ("tokens", self.tokens)):
            if value is not None and value < 0:
                raise ValueError(f"the {name} limit must be >= 0 or None, not {value}")
        if not self.window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, not {self.window_seconds}")

    @property
    def unlimited(self) -> bool:
        return self.requests is None and self.tokens is None


@dataclass(frozen=True)
class Reservation:
    """Tokens charged at admission, to be settled with the real count."""

    subject: str
    tokens: int
    member: str  # the charge's id in the limiter's log


@dataclass(frozen=True)
class Decision:
    allowed: bool
    exceeded: Dimension | None  # which limit refused it
    requests_limit: int | None
    requests_remaining: int | None  # after this request was counted
    requests_reset_seconds: float  # until one more request would be allowed / until the window frees a slot
    tokens_limit: int | None
    tokens_remaining: int | None
    tokens_reset_seconds: float
    retry_after_seconds: int  # >= 1 when refused (ceil of the exceeded dimension's reset), 0 when allowed
    degraded: bool = False  # the store failed and the failure policy decided
    reservation: Reservation | None = None  # what an admitted request reserved, if anything

    def headers(self) -> dict[str, str]:
        """Response headers: the plain `x-ratelimit-*` trio and OpenAI's per-dimension names.

        The plain trio describes requests, or tokens when only tokens are limited; a dimension
        without a limit has no headers at all.
        """
        headers: dict[str, str] = {}
        dimensions = [
            ("requests", self.requests_limit, self.requests_remaining, self.requests_reset_seconds),
            ("tokens", self.tokens_limit, self.tokens_remaining, self.tokens_reset_seconds),
        ]
        limited = [dimension for dimension in dimensions if dimension[1] is not None]
        if limited:
            _, limit, remaining, reset = limited[0]
            headers["x-ratelimit-limit"] = str(limit)
            # A degraded decision knows the limit but not the usage, so it does not guess the rest.
            if remaining is not None:
                headers["x-ratelimit-remaining"] = str(remaining)
                headers["x-ratelimit-reset"] = str(_whole_seconds(reset))
        for name, limit, remaining, reset in limited:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            if remaining is not None:
                headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
                headers[f"x-ratelimit-reset-{name}"] = _duration(reset)
        if not self.allowed:
            headers["retry-after"] = str(self.retry_after_seconds)
        return headers


class RateLimiterUnavailable(Exception):
    """The shared store failed and the limiter is configured to fail closed."""


def _whole_seconds(seconds: float) -> int:
    # Rounding to microseconds first keeps float noise (60.000000000001) from adding a second.
    return max(0, math.ceil(round(seconds, 6)))


def _duration(seconds: float) -> str:
    """OpenAI's reset format, e.g. "12s" or "0.4s", rounded up so clients never retry too early."""
    tenths = max(0, math.ceil(round(seconds * 10, 6)))
    return f"{tenths // 10}s" if tenths % 10 == 0 else f"{tenths / 10:.1f}s"


def _decide(
    limits: Limits,
    requests_ok: bool,
    tokens_ok: bool,
    request_count: int,
    requests_reset: float,
    token_sum: int,
    tokens_reset: float,
) -> Decision:
    """The decision from the window's state after this request was (or was not) recorded."""
    exceeded: Dimension | None = None
    if not requests_ok and not tokens_ok:
        # A retry succeeds only once both have room, so report the one that takes longer.
        exceeded = "tokens" if tokens_reset > requests_reset else "requests"
    elif not requests_ok:
        exceeded = "requests"
    elif not tokens_ok:
        exceeded = "tokens"
    retry_after = 0
    if exceeded is not None:
        retry_after = max(1, _whole_seconds(requests_reset if exceeded == "requests" else tokens_reset))
    return Decision(
        allowed=exceeded is None,
        exceeded=exceeded,
        requests_limit=limits.requests,
        requests_remaining=None if limits.requests is None else max(0, limits.requests - request_count),
        requests_reset_seconds=requests_reset if limits.requests is not None else 0.0,
        tokens_limit=limits.tokens,
        tokens_remaining=None if limits.tokens is None else max(0, limits.tokens - token_sum),
        tokens_reset_seconds=tokens_reset if limits.tokens is not None else 0.0,
        retry_after_seconds=retry_after,
    )


def _tokens_fit(used: int, reserve: int, limit: int) -> bool:
    """Without a reservation: room left at all.  With one: room for all of it."""
    return used + reserve <= limit if reserve > 0 else used < limit


def _unlimited(limits: Limits, degraded: bool = False) -> Decision:
    return Decision(
        allowed=True,
        exceeded=None,
        requests_limit=limits.requests,
        requests_remaining=None,
        requests_reset_seconds=0.0,
        tokens_limit=limits.tokens,
        tokens_remaining=None,
        tokens_reset_seconds=0.0,
        retry_after_seconds=0,
        degraded=degraded,
    )


@dataclass
class _Charge:
    at: float
    cost: int
    member: str = ""


@dataclass
class _SubjectLog:
    requests: deque[float] = field(default_factory=deque)
    charges: deque[_Charge] = field(default_factory=deque)
    token_sum: int = 0
    last_seen: float = 0.0
    window_seconds: float = 60.0

    def trim(self, now: float, window_seconds: float) -> None:
        # "added + window <= now" rather than "added <= now - window": with float times, the entry
        # added at 0.3 must be gone at exactly 60.3 (60.3 - 60 is 0.29999999999999716).
        while self.requests and self.requests[0] + window_seconds <= now:
            self.requests.popleft()
        while self.charges and self.charges[0].at + window_seconds <= now:
            self.token_sum -= self.charges.popleft().cost


class MemoryRateLimiter:
    """In-process sliding logs, one per subject; for a single router replica.

    At most `max_subjects` subjects are tracked.  Subjects idle for a whole window are dropped
    (their logs are empty); past the bound the least recently seen subject is evicted even if its
    window is not empty, which forgets its usage: memory stays bounded under a flood of new keys.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_subjects: int = 100_000) -> None:
        if max_subjects < 1:
            raise ValueError("max_subjects must be >= 1")
        self._clock = clock
        self._max_subjects = max_subjects
        self._subjects: OrderedDict[str, _SubjectLog] = OrderedDict()
        self._members = itertools.count()

    @property
    def tracked_subjects(self) -> int:
        return len(self._subjects)

    def _log(self, subject: str, now: float, limits: Limits) -> _SubjectLog:
        self._drop_idle(now)
        log = self._subjects.get(subject)
        if log is None:
            if len(self._subjects) >= self._max_subjects:
                evicted, _ = self._subjects.popitem(last=False)
                logger.debug("rate limiter evicted subject %s to stay within %d", evicted, self._max_subjects)
            log = self._subjects[subject] = _SubjectLog()
        else:
            self._subjects.move_to_end(subject)
        log.last_seen = now
        log.window_seconds = limits.window_seconds
        log.trim(now, limits.window_seconds)
        return log

    def _drop_idle(self, now: float) -> None:
        # Every entry is added at a subject's last_seen at the latest, and the dict is ordered by
        # last_seen, so the front holds the subjects whose logs have certainly emptied.
        while self._subjects:
            subject, log = next(iter(self._subjects.items()))
            if now - log.last_seen < log.window_seconds:
                return
            del self._subjects[subject]

    async def acquire(self, subject: str, limits: Limits, reserve: int = 0) -> Decision:
        """Admit (and record) one request, reserving `reserve` tokens of the token budget if it is limited."""
        # No await below: on one event loop the check and the record cannot interleave.
        if limits.unlimited:
            return _unlimited(limits)
        now = self._clock()
        log = self._log(subject, now, limits)
        window = limits.window_seconds
        reserve = reserve if limits.tokens is not None else 0
        requests_ok = limits.requests is None or len(log.requests) < limits.requests
        tokens_ok = limits.tokens is None or _tokens_fit(log.token_sum, reserve, limits.tokens)
        reservation = None
        if requests_ok and tokens_ok:
            if limits.requests is not None:
                log.requests.append(now)
            if reserve > 0:
                member = str(next(self._members))
                log.charges.append(_Charge(now, reserve, member))
                log.token_sum += reserve
                reservation = Reservation(subject, reserve, member)

        requests_reset = 0.0
        if limits.requests is not None:
            times = log.requests
            if limits.requests == 0:
                requests_reset = window
            elif times:
                # When full, a slot opens once all but limit-1 of the logged requests have left.
                index = max(0, len(times) - limits.requests)
                requests_reset = max(0.0, times[index] + window - now)

        tokens_reset = 0.0
        if limits.tokens is not None:
            if limits.tokens == 0:
                tokens_reset = window
            elif log.charges and _tokens_fit(log.token_sum, reserve, limits.tokens):
                tokens_reset = max(0.0, log.charges[0].at + window - now)
            elif log.charges:
                left = log.token_sum
                for charge in log.charges:
                    left -= charge.cost
                    if _tokens_fit(left, reserve, limits.tokens):
                        tokens_reset = max(0.0, charge.at + window - now)
                        break

        decision = _decide(limits, requests_ok, tokens_ok, len(log.requests), requests_reset, log.token_sum,
                           tokens_reset)  # fmt: skip
        return dataclasses.replace(decision, reservation=reservation) if reservation else decision

    async def charge_tokens(self, subject: str, limits: Limits, tokens: int) -> None:
        if limits.tokens is None or tokens <= 0:
            return
        now = self._clock()
        log = self._log(subject, now, limits)
        log.charges.append(_Charge(now, tokens))
        log.token_sum += tokens

    async def settle(self, reservation: Reservation, limits: Limits, used: int) -> None:
        """Replace a reservation by the tokens really used (a refund of the rest; never more than reserved
        is refunded).  A reservation that already left the window, or whose subject was dropped, is gone."""
        log = self._subjects.get(reservation.subject)
        if log is None:
            return
        for charge in log.charges:
            if charge.member == reservation.member:
                cost = max(0, used)
                log.token_sum += cost - charge.cost
                charge.cost = cost
                return

    async def aclose(self) -> None:
        self._subjects.clear()


# Shared by both scripts.  Times are Redis's own clock in integer microseconds (exact in a double
# until the year 2255), so every router replica measures the window against one clock.  Redis >= 5
# replicates a script's effects rather than the script, which is what allows TIME before writes.
_LUA_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function cost_of(member)
  return tonumber(string.match(member, '^(%d+):'))
end

-- Drops the charges that left the window and returns the sum of the rest.  The running sum is
-- decremented by exactly what was dropped; if it was lost (eviction) it is rebuilt from the log.
local function token_sum(log_key, sum_key, now, window)
  local cutoff = now - window
  local expired = redis.call('ZRANGEBYSCORE', log_key, '-inf', cutoff)
  local dropped = 0
  for _, member in ipairs(expired) do
    dropped = dropped + cost_of(member)
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', log_key, '-inf', cutoff)
  end
  if redis.call('ZCARD', log_key) == 0 then
    redis.call('DEL', sum_key)
    return 0
  end
  local sum = redis.call('GET', sum_key)
  if not sum then
    sum = 0
    for _, member in ipairs(redis.call('ZRANGE', log_key, 0, -1)) do
      sum = sum + cost_of(member)
    end
    local ttl = redis.call('PTTL', log_key)
    if ttl < 1 then ttl = math.ceil(window / 1000) end
    redis.call('SET', sum_key, sum, 'PX', ttl)
    return sum
  end
  if dropped > 0 then
    return redis.call('DECRBY', sum_key, dropped)
  end
  return tonumber(sum)
end
"""

# KEYS: request log, token log, token sum.
# ARGV: request limit (-1 = unlimited), token limit (-1 = unlimited), window in microseconds, member id,
# tokens to reserve (0 = none).
# Returns: requests ok, tokens ok, request count after recording, requests reset (us), token sum,
# tokens reset (us); booleans as 0/1 because Lua false would end the reply array.
ACQUIRE_LUA = (
    _LUA_PRELUDE
    + """
local request_log, token_log, sum_key = KEYS[1], KEYS[2], KEYS[3]
local request_limit, token_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local reserve = tonumber(ARGV[5])
local now = now_us()
local cutoff = now - window

local count = 0
if request_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', request_log, '-inf', cutoff)
  count = redis.call('ZCARD', request_log)
end
local used = 0
if token_limit >= 0 then
  used = token_sum(token_log, sum_key, now, window)
end

-- Without a reservation: room left at all.  With one: room for all of it.
local function fits(sum)
  if reserve > 0 then return sum + reserve <= token_limit end
  return sum < token_limit
end

local requests_ok = request_limit < 0 or count < request_limit
local tokens_ok = token_limit < 0 or fits(used)
if requests_ok and tokens_ok and request_limit >= 0 then
  redis.call('ZADD', request_log, now, ARGV[4])
  redis.call('PEXPIRE', request_log, math.ceil(window / 1000))
  count = count + 1
end
local reserved = 0
if requests_ok and tokens_ok and token_limit >= 0 and reserve > 0 then
  redis.call('ZADD', token_log, now, reserve .. ':' .. ARGV[4])
  used = redis.call('INCRBY', sum_key, reserve)
  redis.call('PEXPIRE', token_log, math.ceil(window / 1000))
  redis.call('PEXPIRE', sum_key, math.ceil(window / 1000))
  reserved = reserve
end

local requests_reset = 0
if request_limit == 0 then
  requests_reset = window
elseif request_limit > 0 and count > 0 then
  -- When full, a slot opens once all but limit-1 of the logged requests have left.
  local index = math.max(0, count - request_limit)
  local entry = redis.call('ZRANGE', request_log, index, index, 'WITHSCORES')
  requests_reset = math.max(0, tonumber(entry[2]) + window - now)
end

local tokens_reset = 0
if token_limit == 0 then
  tokens_reset = window
elseif token_limit > 0 and used > 0 then
  if fits(used) then
    local oldest = redis.call('ZRANGE', token_log, 0, 0, 'WITHSCORES')
    tokens_reset = math.max(0, tonumber(oldest[2]) + window - now)
  else
    local left, start, batch = used, 0, 256
    while tokens_reset == 0 do
      local entries = redis.call('ZRANGE', token_log, start, start + batch - 1, 'WITHSCORES')
      if #entries == 0 then break end
      for i = 1, #entries, 2 do
        left = left - cost_of(entries[i])
        if fits(left) then
          tokens_reset = math.max(1, tonumber(entries[i + 1]) + window - now)
          break
        end
      end
      start = start + batch
    end
  end
end

return {requests_ok and 1 or 0, tokens_ok and 1 or 0, count, requests_reset, used, tokens_reset, reserved}
"""
)

# KEYS: token log, token sum.  ARGV: tokens reserved, tokens used, the reservation's member id, window in
# microseconds.  Replaces the reservation's charge by the tokens used, at the reservation's time.
SETTLE_LUA = (
    _LUA_PRELUDE
    + """
local token_log, sum_key = KEYS[1], KEYS[2]
local reserved, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_us()
token_sum(token_log, sum_key, now, tonumber(ARGV[4]))
local member = ARGV[1] .. ':' .. ARGV[3]
local score = redis.call('ZSCORE', token_log, member)
if not score then
  return 0
end
redis.call('ZREM', token_log, member)
if used > 0 then
  redis.call('ZADD', token_log, score, used .. ':' .. ARGV[3])
end
if redis.call('EXISTS', sum_key) == 1 then
  redis.call('DECRBY', sum_key, reserved - used)
end
return 1
"""
)

# KEYS: token log, token sum.  ARGV: cost (> 0), window in microseconds, member id.
CHARGE_LUA = (
    _LUA_PRELUDE
    + """
local token_log, sum_key = KEYS[1], KEYS[2]
local window = tonumber(ARGV[2])
local now = now_us()
-- Trim first: the running sum must only ever cover what the log holds.
token_sum(token_log, sum_key, now, window)
redis.call('ZADD', token_log, now, ARGV[1] .. ':' .. ARGV[3])
redis.call('INCRBY', sum_key, ARGV[1])
local ttl = math.ceil(window / 1000)
redis.call('PEXPIRE', token_log, ttl)
redis.call('PEXPIRE', sum_key, ttl)
return 1
"""
)

_MICROSECONDS = 1_000_000


def _window_us(limits: Limits) -> int:
    return max(1, round(limits.window_seconds * _MICROSECONDS))


class RedisRateLimiter:
    """Sliding logs in Redis shared by every replica, checked and recorded by one script call.

    Per subject: a sorted set of admitted requests (score = time), a sorted set of token charges
    (member "<cost>:<id>") and the running sum of those costs.  Each key expires one window after
    its last write, so idle subjects vanish.  `fail_open` decides what happens while Redis fails:
    admit unchecked (degraded decisions) or raise RateLimiterUnavailable.
    """

    def __init__(self, redis: redis.asyncio.Redis, fail_open: bool, prefix: str = "modelfleet:ratelimit:") -> None:
        self.fail_open = fail_open
        self._prefix = prefix
        self._acquire_script = redis.register_script(ACQUIRE_LUA)
        self._charge_script = redis.register_script(CHARGE_LUA)
        self._settle_script = redis.register_script(SETTLE_LUA)
        # Members of a sorted set must be unique across replicas, even for one microsecond.
        self._instance = secrets.token_hex(8)
        self._sequence = itertools.count()
        self._healthy = True
        self._outage_reported = False

    @property
    def healthy(self) -> bool:
        return self._healthy

    def keys(self, subject: str) -> tuple[str, str, str]:
        """The request log, token log and token sum keys of `subject`.

        The hash tag puts all three in one cluster slot, as a script's keys must be.  A subject
        that would break the tag (empty, or containing braces) is replaced by its digest.
        """
        tag = subject
        if not subject or "{" in subject or "}" in subject:
            tag = "sha256:" + hashlib.sha256(subject.encode()).hexdigest()[:32]
        base = f"{self._prefix}{{{tag}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:tokens-sum"

    def _member_id(self) -> str:
        return f"{self._instance}:{next(self._sequence)}"

    async def acquire(self, subject: str, limits: Limits, reserve: int = 0) -> Decision:
        """Admit (and record) one request, reserving `reserve` tokens of the token budget if it is limited."""
        if limits.unlimited:
            return _unlimited(limits)
        window_us = _window_us(limits)
        member = self._member_id()
        args: Sequence[int | str] = [
            -1 if limits.requests is None else limits.requests,
            -1 if limits.tokens is None else limits.tokens,
            window_us,
            member,
            max(0, reserve) if limits.tokens is not None else 0,
        ]
        try:
            reply = await self._acquire_script(keys=list(self.keys(subject)), args=args)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            if not self.fail_open:
                raise RateLimiterUnavailable(f"the rate limit store is unavailable: {exc}") from exc
            return _unlimited(limits, degraded=True)
        self._succeeded()
        requests_ok, tokens_ok, count, requests_reset_us, token_sum, tokens_reset_us, reserved = (int(x) for x in reply)
        decision = _decide(
            limits,
            requests_ok=bool(requests_ok),
            tokens_ok=bool(tokens_ok),
            request_count=count,
            requests_reset=requests_reset_us / _MICROSECONDS,
            token_sum=token_sum,
            tokens_reset=tokens_reset_us / _MICROSECONDS,
        )
        if reserved > 0:
            return dataclasses.replace(decision, reservation=Reservation(subject, reserved, member))
        return decision

    async def settle(self, reservation: Reservation, limits: Limits, used: int) -> None:
        """Replace a reservation by the tokens really used (a refund of the rest)."""
        _, token_log, token_sum = self.keys(reservation.subject)
        try:
            await self._settle_script(keys=[token_log, token_sum],
                                      args=[reservation.tokens, max(0, used), reservation.member,
                                            _window_us(limits)])  # fmt: skip
        except (RedisError, OSError) as exc:
            # The reservation stays charged until it leaves the window: the budget is only tighter.
            self._healthy = False
            logger.debug("rate limiter could not settle a reservation of %s: %s", reservation.subject, exc)
            return
        self._succeeded()

    async def charge_tokens(self, subject: str, limits: Limits, tokens: int) -> None:
        if limits.tokens is None or tokens <= 0:
            return
        _, token_log, token_sum = self.keys(subject)
        try:
            await self._charge_script(
                keys=[token_log, token_sum], args=[int(tokens), _window_us(limits), self._member_id()]
            )
        except (RedisError, OSError) as exc:
            # The response has been served already; losing one charge only loosens the budget.
            self._healthy = False
            logger.debug("rate limiter could not charge %d tokens to %s: %s", tokens, subject, exc)
            return
        self._succeeded()

    async def aclose(self) -> None:
        """Nothing to release: the Redis client belongs to the application."""

    def _failed(self, exc: BaseException) -> None:
        self._healthy = False
        if not self._outage_reported:
            self._outage_reported = True
            policy = "admitting requests unchecked (fail open)" if self.fail_open else "refusing requests (fail closed)"
            logger.warning("rate limit store unavailable, %s: %s: %s", policy, type(exc).__name__, exc)

    def _succeeded(self) -> None:
        self._healthy = True
        if self._outage_reported:
            self._outage_reported = False
            logger.info("rate limit store is available again")
