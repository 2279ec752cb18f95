"""Redis connections that ride out an outage: one factory for every service, and a retry helper for loops.

Why: redis-py's defaults (a 5 s socket timeout, three quick retries) turn a 5 s stall of Redis (SIGSTOP, a
long fork for a rewrite, a slow disk) into a ``TimeoutError`` in every service, and a Redis restart into a
``ConnectionError`` that ends the loop that saw it. Here:

* ``socket_timeout`` is ``stall_tolerance_s`` (15 s) plus the longest ``BLOCK`` the caller uses
  (``max_block_ms``): a stalled Redis is waited for rather than failed, and a blocking ``XREADGROUP`` /
  ``XREAD`` is never cut short by the socket timeout. Waiting is also what keeps commands exactly-once:
  a command that timed out and was sent again could run twice once Redis wakes up.
* redis-py's ``Retry`` (``ExponentialBackoff``, capped at 1 s, ``RETRIES`` attempts, about 6.5 s: a Redis restart) reconnects
  silently on ``ConnectionError`` / ``TimeoutError`` / ``BusyLoadingError`` (Redis loading its append-only
  file after a restart): a blink is invisible to the caller.
* ``health_check_interval`` pings a connection idle that long before using it, so a connection that died
  while idle (Redis restarted) is replaced before a command is lost on it.

An outage longer than that reaches the caller as one of ``OUTAGE_ERRORS``. Service loops wrap each Redis
call (or each iteration) in ``retry_forever`` (asyncio) / ``retry_forever_sync`` (threads), which log once
per outage (and once on recovery), back off up to ``max_delay_s`` and try again until it succeeds or the
stop event is set; they never raise an outage error. Any other exception (a ``ResponseError`` such as
``NOGROUP`` when Redis came back empty) propagates: the caller knows how to rebuild what is missing.

Intended use (the services are wired to it after the issue 10 refactor lands)::

    from protocol.redis_conn import async_client, retry_forever

    r = async_client(settings.redis_url, decode_responses=True, max_block_ms=1000)
    while not stop.is_set():
        resp = await retry_forever(
            lambda: r.xreadgroup(GROUP, consumer, {stream: ">"}, count=256, block=1000),
            what="read requests", log=log, stop_event=stop)
        if resp is None:        # stopped while Redis was away
            break
        ...
        await retry_forever(lambda: r.xack(stream, GROUP, *ids), what="ack requests", log=log, stop_event=stop)

    # a worker (threads):  sync_client(url, max_block_ms=500); retry_forever_sync(op, what=..., log=...)

Retried writes are at least once: an ``XADD`` whose reply was lost when Redis died may be applied twice
(before the crash and on the retry); consumers already tolerate duplicates by request id and step id.
``retry_forever`` returns ``op()``'s result, or ``None`` when the stop event was set before it succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

T = TypeVar("T")

OUTAGE_ERRORS: tuple[type[Exception], ...] = (ConnectionError, TimeoutError, BusyLoadingError)
STALL_TOLERANCE_S = 15.0
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_INTERVAL_S = 10
RETRIES = 10
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0


def client_options(max_block_ms: int = 0, stall_tolerance_s: float = STALL_TOLERANCE_S) -> dict[str, Any]:
    """The connection options both factories share (without the sync / asyncio ``Retry`` object)."""
    return {
        "socket_timeout": stall_tolerance_s + max_block_ms / 1000.0,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry_on_error": list(OUTAGE_ERRORS),
    }


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S)


def async_client(url: str, *, max_block_ms: int = 0, stall_tolerance_s: float = STALL_TOLERANCE_S,
                 **kw: Any) -> aioredis.Redis:
    """``redis.asyncio.Redis.from_url(url, ...)`` with the retry and timeout policy above; ``kw`` (e.g.
    ``decode_responses=True``, ``connection_pool_class=BlockingConnectionPool``, ``max_connections``)
    is passed through and overrides a default of the same name."""
    opts = client_options(max_block_ms, stall_tolerance_s)
    opts["retry"] = AsyncRetry(_backoff(), RETRIES, supported_errors=OUTAGE_ERRORS)
    opts.update(kw)
    # Redis.from_url would hand connection_pool_class to every connection (a TypeError at the first command)
    pool_class = opts.pop("connection_pool_class", aioredis.ConnectionPool)
    client = aioredis.Redis(connection_pool=pool_class.from_url(url, **opts))
    client.auto_close_connection_pool = True  # as from_url does: closing the client closes its pool
    return client


def sync_client(url: str, *, max_block_ms: int = 0, stall_tolerance_s: float = STALL_TOLERANCE_S,
                **kw: Any) -> redis.Redis:
    """``redis.Redis.from_url(url, ...)`` with the same policy as ``async_client``."""
    opts = client_options(max_block_ms, stall_tolerance_s)
    opts["retry"] = Retry(_backoff(), RETRIES, supported_errors=OUTAGE_ERRORS)
    opts.update(kw)
    pool_class = opts.pop("connection_pool_class", redis.ConnectionPool)
    client = redis.Redis(connection_pool=pool_class.from_url(url, **opts))
    client.auto_close_connection_pool = True
    return client


class Outage:
    """One outage as a loop sees it: logged when it starts and when it ends, with a capped backoff."""

    def __init__(self, what: str, log: logging.Logger, base_s: float, max_delay_s: float):
        self.what, self.log = what, log
        self.base_s, self.max_delay_s = base_s, max_delay_s
        self.failures = 0
        self.started = 0.0

    def failed(self, err: Exception) -> float:
        """Record a failure; the seconds to wait before the next attempt."""
        if self.failures == 0:
            self.started = time.monotonic()
            self.log.warning("redis unavailable (%s): %s: %s; retrying", self.what, type(err).__name__, err)
        self.failures += 1
        return min(self.max_delay_s, self.base_s * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        if self.failures:
            self.log.warning("redis back (%s) after %.1f s, %d attempts", self.what,
                             time.monotonic() - self.started, self.failures)


async def retry_forever(op: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger,
                        stop_event: asyncio.Event | None = None, base_s: float = 0.1,
                        max_delay_s: float = 2.0) -> T | None:
    """``await op()`` until it succeeds; ``OUTAGE_ERRORS`` are logged once per outage and retried with
    capped exponential backoff. Returns ``None`` once ``stop_event`` is set before a success."""
    outage = Outage(what, log, base_s, max_delay_s)
    while stop_event is None or not stop_event.is_set():
        try:
            result = await op()
        except AuthenticationError:  # a wrong password is no outage: waiting will not fix it
            raise
        except OUTAGE_ERRORS as e:
            delay = outage.failed(e)
            if stop_event is None:
                await asyncio.sleep(delay)
            else:  # wake at once on stop
                try:
                    await asyncio.wait_for(stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            continue
        outage.succeeded()
        return result
    return None


def retry_forever_sync(op: Callable[[], T], *, what: str, log: logging.Logger,
                       stop_event: threading.Event | None = None, base_s: float = 0.1,
                       max_delay_s: float = 2.0) -> T | None:
    """``retry_forever`` for threads: ``op()`` until it succeeds or ``stop_event`` is set."""
    outage = Outage(what, log, base_s, max_delay_s)
    stop = stop_event or threading.Event()
    while not stop.is_set():
        try:
            result = op()
        except AuthenticationError:  # a wrong password is no outage: waiting will not fix it
            raise
        except OUTAGE_ERRORS as e:
            stop.wait(outage.failed(e))
            continue
        outage.succeeded()
        return result
    return None


async def read_group(r: aioredis.Redis, stream: str, group: str, consumer: str, *, last_id: str = ">",
                     count: int, block: int | None, create_id: str = "$") -> list:
    """``XREADGROUP`` of one stream: its ``[(entry_id, fields)]``. A group Redis no longer has (restarted
    without its data) is created again, from ``create_id``, and this read returns nothing."""
    try:
        resp = await r.xreadgroup(group, consumer, {stream: last_id}, count=count, block=block)
    except redis.ResponseError as e:
        if "NOGROUP" not in str(e):
            raise
        try:
            await r.xgroup_create(stream, group, id=create_id, mkstream=True)
        except redis.ResponseError as e2:  # another reader created it meanwhile
            if "BUSYGROUP" not in str(e2):
                raise
        return []
    return resp[0][1] if resp else []
