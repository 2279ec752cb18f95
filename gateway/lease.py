"""The gateway process's lease: ``pf:gw:{instance}``, a key with a short TTL refreshed by a background task.
Interactive requests carry the instance id; the scheduler aborts them once the lease is gone (this process
died), so an orphaned stream frees its blocks within seconds. Every start is a new instance."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

import redis.asyncio as aioredis

from protocol import streams as S
from protocol.redis_conn import retry_forever

log = logging.getLogger("pagedfleet.gateway")


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class GatewayLease:
    def __init__(self, redis: aioredis.Redis, instance: str | None = None, ttl_s: float = S.GATEWAY_LEASE_TTL_S):
        self.redis = redis
        self.instance = instance or new_instance_id()
        self.key = S.gateway_lease_key(self.instance)
        self.ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def _refresh(self) -> None:
        await retry_forever(lambda: self.redis.set(self.key, "1", px=self.ttl_ms), what="gateway lease", log=log,
                            stop_event=self._stop)

    async def start(self) -> None:
        await self._refresh()  # held before the first request is served
        self._task = asyncio.create_task(self._keep(), name="gateway-lease")

    async def _keep(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.ttl_ms / 4000)
            except asyncio.TimeoutError:
                pass
            try:
                await self._refresh()
            except Exception as e:  # never let the lease task die while the gateway serves
                log.warning("gateway lease refresh failed: %r", e)

    async def stop(self) -> None:
        """Stop refreshing and drop the key (a gateway shutting down: its streams end with it)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.redis.delete(self.key)
        except Exception:
            pass
