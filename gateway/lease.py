"""The gateway process's lease: ``pf:gw:{instance}``, a key with a short TTL refreshed by a background thread.
Interactive requests carry the instance id; the scheduler aborts them once the lease is gone (this process
died), so an orphaned stream frees its blocks within seconds. Every start is a new instance."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid

from protocol import streams as S
from protocol.redis_conn import retry_forever_sync, sync_client

log = logging.getLogger("pagedfleet.gateway")


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class GatewayLease:
    """Held by a thread with its own connection, not by a task of the event loop: under load (hundreds of
    streams) the loop can fall seconds behind, and a lapse would abort every stream of a live gateway.
    The lease says this process lives; the process's death is what it must detect."""

    def __init__(self, redis_url: str, instance: str | None = None, ttl_s: float = S.GATEWAY_LEASE_TTL_S):
        self.redis = sync_client(redis_url, decode_responses=True)
        self.instance = instance or new_instance_id()
        self.key = S.gateway_lease_key(self.instance)
        self.ttl_ms = int(ttl_s * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _refresh(self) -> None:
        retry_forever_sync(lambda: self.redis.set(self.key, "1", px=self.ttl_ms), what="gateway lease", log=log,
                           stop_event=self._stop)

    async def start(self) -> None:
        await asyncio.to_thread(self._refresh)  # held before the first request is served
        self._thread = threading.Thread(target=self._keep, name="gateway-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_ms / 4000):
            try:
                self._refresh()
            except Exception as e:  # never let the lease thread die while the gateway serves
                log.warning("gateway lease refresh failed: %r", e)

    async def stop(self) -> None:
        """Stop refreshing and drop the key (a gateway shutting down: its streams end with it)."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        try:
            await asyncio.to_thread(self.redis.delete, self.key)
        except Exception:
            pass
        self.redis.close()
