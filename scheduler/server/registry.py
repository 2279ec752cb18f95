"""The scheduler lease (one scheduler at a time) and the worker registry: registrations in ``pf:workers``,
heartbeats in ``pf:hb:{worker}``; a worker is born when it registers and heartbeats, and dies when its
heartbeat expires, its registration vanishes or a new incarnation replaces it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from protocol import streams as S
from protocol.heap import freeze_heap
from scheduler.scheduler import Scheduler
from scheduler.server.state import ServiceState, WorkerHandle

log = logging.getLogger("pagedfleet.scheduler")

# After Redis was away (a check that took long, or a long gap since the last one) heartbeats have lapsed
# there while the workers could not refresh them: no worker is declared dead for this long.
OUTAGE_GRACE_S = 3.0
SLOW_CHECK_S = 1.0


class Lease:
    def __init__(self, state: ServiceState, instance: str):
        self.state = state
        self.instance = instance

    async def acquire(self) -> None:
        """Wait until this scheduler holds the lease key."""
        s = self.state
        while not s.stopping.is_set():
            if await s.r.set(S.SCHEDULER_INFO, self.instance, nx=True, px=int(s.settings.lease_ttl * 1000)):
                return
            holder = await s.r.get(S.SCHEDULER_INFO)
            log.warning("another scheduler (%s) holds the lease; waiting", holder)
            await asyncio.sleep(1.0)

    async def keep(self) -> None:
        """Refresh the lease; stop the service if another scheduler took it."""
        s = self.state
        while not s.stopping.is_set():
            await asyncio.sleep(s.settings.lease_ttl / 4)
            holder = await s.r.get(S.SCHEDULER_INFO)
            if holder not in (None, self.instance):
                log.error("lost the scheduler lease to %s; stopping", holder)
                s.stopping.set()
                return
            await s.r.set(S.SCHEDULER_INFO, self.instance, px=int(s.settings.lease_ttl * 1000))

    async def release(self) -> None:
        if await self.state.r.get(S.SCHEDULER_INFO) == self.instance:
            await self.state.r.delete(S.SCHEDULER_INFO)


class WorkerRegistry:
    def __init__(self, state: ServiceState, declare_dead: Callable[[WorkerHandle, str], Awaitable[None]],
                 start_worker: Callable[[WorkerHandle], None], place_orphans: Callable[[], Awaitable[None]]):
        self.state = state
        self.declare_dead = declare_dead
        self.start_worker = start_worker  # starts the worker's step loop
        self.place_orphans = place_orphans
        self._last_check = 0.0
        self._grace_until = 0.0

    async def _registrations(self) -> dict[str, S.WorkerRegistration]:
        regs: dict[str, S.WorkerRegistration] = {}
        for wid, v in (await self.state.r.hgetall(S.WORKERS)).items():
            try:
                regs[wid] = S.WorkerRegistration.model_validate_json(v)
            except Exception:
                log.warning("ignoring a malformed registration of %s", wid)
        return regs

    async def _heartbeats(self, wids: list[str]) -> dict[str, str | None]:
        if not wids:
            return {}
        async with self.state.r.pipeline(transaction=False) as p:
            for wid in wids:
                p.get(S.heartbeat_key(wid))
            vals = await p.execute()
        return dict(zip(wids, vals))

    async def check_workers(self) -> None:
        """Declare the dead ones dead and add the new ones."""
        s = self.state
        started = time.monotonic()
        regs = await self._registrations()
        beats = await self._heartbeats(sorted(set(regs) | set(s.workers)))
        now = time.monotonic()
        if self._last_check and (now - started > SLOW_CHECK_S or started - self._last_check > SLOW_CHECK_S):
            self._grace_until = now + OUTAGE_GRACE_S
        self._last_check = now
        for wid, h in list(s.workers.items()) if now >= self._grace_until else ():
            reg = regs.get(wid)
            if beats.get(wid) != h.reg.incarnation or reg is None or reg.incarnation != h.reg.incarnation:
                reason = ("unregistered: it stopped" if reg is None else "missed heartbeats"
                          if beats.get(wid) != h.reg.incarnation else "re-registered")
                await self.declare_dead(h, reason)
        for wid, reg in regs.items():
            h = s.workers.get(wid)
            if h is not None and reg.draining and not h.reg.draining:  # the same incarnation, now draining
                log.info("worker %s draining: no new requests placed on it (%d running)", wid, len(h.requests))
                h.reg = reg
            if wid in s.workers or beats.get(wid) != reg.incarnation:
                continue
            await self.add_worker(reg)
        if s.metrics is not None:
            for wid, h in s.workers.items():
                s.metrics.set_worker_up(wid, h.reg.info.model, True, 0.0)

    async def add_worker(self, reg: S.WorkerRegistration) -> WorkerHandle | None:
        s = self.state
        try:
            sched = Scheduler(s.settings.scheduler_config(), reg.info)
        except ValueError as e:
            log.error("cannot build a Scheduler for worker %s: %s", reg.info.worker_id, e)
            return None
        h = WorkerHandle(reg, sched, s.settings.max_plans_in_flight)
        s.workers[h.wid] = h
        if s.freeze_pools:  # its block pools (an object per block): out of the full collections
            freeze_heap()
        if s.metrics is not None:
            s.metrics.register_worker(reg.info)
        log.info("worker %s registered: %d GPU blocks, %d CPU blocks, max_model_len %d", h.wid,
                 reg.info.num_gpu_blocks, reg.info.num_cpu_blocks, reg.info.max_model_len)
        self.start_worker(h)
        s.have_worker.set()
        await self.place_orphans()
        return h
