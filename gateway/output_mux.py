"""One reader of output streams per gateway process: a step's deltas for every request it follows in one
XREAD over all their streams, instead of one blocking XREAD per request.

The scheduler writes one delta per running request per step; with a read per request the gateway made one
Redis round trip and one parse per delta, and at a few hundred streams that round trip, not the GPU,
capped the fleet's output tokens per second. Here one task reads every followed stream at once and hands
each entry to its follower's queue; a new follower wakes the blocked read through this process's own wake
stream, so it is read from its first delta. Entries stay undecoded (the follower decodes: a bad entry fails
its own request only). An outage reaches every follower as ``OUTAGE``: the follower checks its request is
still known while the reader retries.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as aioredis

from protocol import streams as S
from protocol.redis_conn import OUTAGE_ERRORS, Outage

log = logging.getLogger("pagedfleet.gateway")

OUTAGE = object()  # put on every follower's queue when a read fails for an outage
BLOCK_MS = 1000
WAKE_TTL_S = 3600


class _Follower:
    __slots__ = ("queue", "last")

    def __init__(self, last: str):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last = last


class OutputMux:
    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self.wake_key = f"{S.PREFIX}gwwake:{uuid.uuid4().hex}"
        self._followers: dict[str, _Follower] = {}
        self._task: asyncio.Task | None = None

    def follow(self, key: str, last: str = "0-0") -> asyncio.Queue | None:
        """The queue of ``key``'s entries after ``last`` (pairs of entry id and fields, or ``OUTAGE``); None
        if this process follows the stream already (the caller reads it itself)."""
        if key in self._followers:
            return None
        f = self._followers[key] = _Follower(last)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._read())
        else:
            self._wake()
        return f.queue

    def unfollow(self, key: str) -> None:
        self._followers.pop(key, None)

    def _wake(self) -> None:
        """Make the blocked read return, so the next one includes the new stream (a lost wake only delays
        the new follower to the next step's delta or the read's timeout)."""
        async def wake() -> None:
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    p.xadd(self.wake_key, {"w": "1"}, maxlen=1)
                    p.expire(self.wake_key, WAKE_TTL_S)
                    await p.execute()
            except OUTAGE_ERRORS:
                pass

        task = asyncio.get_running_loop().create_task(wake())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _read(self) -> None:
        outage = Outage("reading output streams", log, base_s=0.1, max_delay_s=2.0)
        wake_last = "$"
        while self._followers:
            streams = {k: f.last for k, f in self._followers.items()}
            streams[self.wake_key] = wake_last
            try:
                resp = await self.redis.xread(streams, count=256, block=BLOCK_MS)
            except OUTAGE_ERRORS as e:
                for f in self._followers.values():
                    f.queue.put_nowait(OUTAGE)
                await asyncio.sleep(outage.failed(e))
                continue
            outage.succeeded()
            outage = Outage("reading output streams", log, base_s=0.1, max_delay_s=2.0)
            for key, entries in resp or ():
                if key == self.wake_key:
                    wake_last = entries[-1][0]
                    continue
                f = self._followers.get(key)
                if f is None:  # unfollowed while the read was out
                    continue
                f.last = entries[-1][0]
                for entry in entries:
                    f.queue.put_nowait(entry)

    async def aclose(self) -> None:
        self._followers.clear()
        if self._task is not None:
            self._task.cancel()
