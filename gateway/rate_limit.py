"""Per-key rate limits kept in Redis (so every gateway replica shares them): token buckets.

A bucket holds a minute's worth (`rate_limit_rpm` requests, `rate_limit_tpm` tokens): that is the burst; it
refills continuously at the per-minute rate. Redis's clock (TIME) is the one clock, so replicas agree. A
request that costs more than a whole bucket passes when the bucket is full and leaves it in debt.
"""

from __future__ import annotations

import logging
import math

from gateway.errors import BadRequest

log = logging.getLogger("pagedfleet.gateway")

TAKE_LUA = """
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= math.min(cost, cap) then tokens = tokens - cost else wait = (math.min(cost, cap) - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(cap / rate) + 60)
return tostring(wait)
"""


def bucket_key(kind: str, owner: str) -> str:
    return f"pf:ratelimit:{kind}:{owner or 'anonymous'}"


async def take(redis, kind: str, owner: str, per_minute: int, cost: float = 1.0) -> float:
    """Take `cost` from the caller's bucket: 0.0 when allowed, else the seconds until it would be. A Redis
    failure lets the request through (a limiter never takes the API down with it)."""
    try:
        wait = await redis.eval(TAKE_LUA, 1, bucket_key(kind, owner), per_minute, per_minute / 60.0, cost)
    except Exception as e:  # noqa: BLE001
        log.warning("rate limiter unavailable, not limiting: %s", e)
        return 0.0
    return float(wait)


def too_many(kind: str, per_minute: int, wait_s: float) -> BadRequest:
    what = "requests" if kind == "requests" else "tokens"
    return BadRequest(f"rate limit reached: {per_minute} {what} per minute for this key; retry in "
                      f"{wait_s:.1f} s", None, 429, "rate_limit_exceeded",
                      headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


async def charge_tokens(redis, settings, owner: str | None, tokens: int) -> None:
    """Charge an accepted request's tokens (prompt + max_tokens x n) to its key, or raise a 429.
    `owner` None: not an HTTP request (a batch line): batches are paced by their own in-flight bound."""
    per_minute = settings.rate_limit_tpm
    if owner is None or not per_minute:
        return
    wait = await take(redis, "tokens", owner, per_minute, tokens)
    if wait > 0:
        raise too_many("tokens", per_minute, wait)
