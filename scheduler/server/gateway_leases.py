"""Orphaned requests: an interactive request carries the instance id of the gateway whose client follows it
(``RequestCommand.gateway``); each gateway process holds a lease key ``pf:gw:{instance}`` with a short TTL.
A gateway whose lease stayed missing for a TTL while Redis answered is gone, and so are its clients: its
requests are aborted, which frees their blocks. Job requests carry no gateway and run on.

One EXISTS per distinct gateway of the tracked requests, not per request. Missing time is counted only
across checks that follow each other closely: after a Redis outage or stall (leases expire while Redis is
stopped, and every gateway needs a moment to set its key again) the count starts afresh."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from protocol import streams as S
from scheduler.server.state import ServiceState

log = logging.getLogger("pagedfleet.scheduler")


class GatewayLeases:
    def __init__(self, state: ServiceState, abort: Callable[[str, str], Awaitable[None]],
                 ttl_s: float = S.GATEWAY_LEASE_TTL_S):
        self.state = state
        self.abort = abort
        self.ttl_s = ttl_s
        self.missing_since: dict[str, float] = {}  # gateway -> when its lease was first seen missing
        self._last_check = 0.0

    async def check(self) -> None:
        """Abort the requests of every gateway whose lease is gone."""
        by_gateway: dict[str, list[str]] = {}
        for rid, st in self.state.requests.items():
            if st.gateway and not st.aborted:
                by_gateway.setdefault(st.gateway, []).append(rid)
        if not by_gateway:
            self.missing_since.clear()
            return
        started = time.monotonic()
        gateways = sorted(by_gateway)
        async with self.state.r.pipeline(transaction=False) as p:
            for gw in gateways:
                p.exists(S.gateway_lease_key(gw))
            alive = await p.execute()
        now = time.monotonic()
        # a slow answer or a long gap since the last check: Redis was away, the leases may have lapsed there
        fresh = now - started < self.ttl_s / 2 and started - self._last_check < self.ttl_s / 2
        self._last_check = now
        if not fresh:
            self.missing_since.clear()
            return
        for gw, ok in zip(gateways, alive):
            if ok:
                self.missing_since.pop(gw, None)
                continue
            since = self.missing_since.setdefault(gw, now)
            if now - since < self.ttl_s:
                continue
            del self.missing_since[gw]
            log.warning("gateway %s is gone (no lease for %.1f s); aborting its %d requests", gw, now - since,
                        len(by_gateway[gw]))
            for rid in by_gateway[gw]:
                await self.abort(rid, f"gateway {gw} is gone")
        for gw in set(self.missing_since) - set(gateways):
            del self.missing_since[gw]
