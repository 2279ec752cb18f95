"""The scheduler service: `python -m scheduler.service` (one per fleet). It wires the parts in
``scheduler/server/`` (see its ``__init__``) around one ``Scheduler`` (block ledger) per registered worker.

It reads GenerationRequests from the requests stream (consumer group ``scheduler``) and runs the
iteration-level loop of every worker concurrently (one asyncio task each): schedule -> StepPlan on
``pf:plan:{worker}`` -> its StepResult on ``pf:results`` -> ``Scheduler.update`` -> RequestOutputDeltas on
``pf:out:{request}``.

Failure handling: workers heartbeat (``pf:hb:{worker}``, a key with a TTL holding their incarnation). A
worker whose key expired (or whose incarnation changed) is declared dead and each of its unfinished requests
is re-added elsewhere with the tokens it already generated (recompute). Accepted requests are kept in
``pf:active`` until they finish, so a restarted scheduler resumes them too. Nothing is acknowledged before
its effect is recorded. An interactive request whose gateway is gone (its lease ``pf:gw:{instance}``
lapsed) is aborted (``scheduler/server/gateway_leases.py``); jobs run on.

Settings: ``SchedulerSettings`` (scheduler/server/config.py): environment ``PAGEDFLEET_*`` and flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import redis
from redis.exceptions import ResponseError

from protocol import streams as S
from protocol.redis_conn import OUTAGE_ERRORS, Outage, async_client, sync_client
from scheduler.server.config import SchedulerSettings
from scheduler.server.gateway_leases import GatewayLeases
from scheduler.server.http import serve_http
from scheduler.server.intake import Intake
from scheduler.server.metrics import SchedulerMetrics, scheduler_metrics
from scheduler.server.placement import Placement
from scheduler.server.publishing import Publisher
from scheduler.server.recovery import Recovery
from scheduler.server.registry import Lease, WorkerRegistry
from scheduler.server.state import ServiceState
from scheduler.server.stats_log import StatsLog
from scheduler.server.step_loop import StepLoop
from scheduler.server.stream_trim import safe_trim_minid

log = logging.getLogger("pagedfleet.scheduler")

STREAM_POLL_S = 2.0  # seconds between stream gauge polls
TRIM_S = 10.0  # seconds between trims of the requests / results streams


class SchedulerService(ServiceState):
    """The parts, wired; the shared state is the service itself (``ServiceState``)."""

    def __init__(self, settings: SchedulerSettings, metrics: SchedulerMetrics | None = None,
                 freeze_pools: bool = False):
        super().__init__(settings, metrics, freeze_pools)
        self.instance = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.publisher = Publisher(self)
        self.placement = Placement(self, self.publisher.finish_locally)
        self.recovery = Recovery(self, self.placement, self.publisher)
        self.step_loop = StepLoop(self, self.publisher, self.recovery.declare_dead)
        self.registry = WorkerRegistry(self, self.recovery.declare_dead, self.step_loop.start,
                                       self.placement.place_orphans)
        self.intake = Intake(self, self.placement, self.publisher)
        self.gateway_leases = GatewayLeases(self, self.intake.abort)
        self.lease = Lease(self, self.instance)
        self.stats_log = StatsLog(self)
        self._last_trim = 0.0

    async def connect(self) -> None:
        self.r = async_client(self.settings.redis_url, decode_responses=True, max_block_ms=1000)
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for stream, gid in ((S.REQUESTS, "0"), (S.RESULTS, "$")):
            try:
                await self.r.xgroup_create(stream, S.SCHEDULER_GROUP, id=gid, mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def monitor_loop(self) -> None:
        last_poll = 0.0
        while not self.stopping.is_set():
            try:
                await self.registry.check_workers()
                await self.placement.place_orphans()
                await self.gateway_leases.check()
                now = time.monotonic()
                if now - last_poll > STREAM_POLL_S:
                    last_poll = now
                    await asyncio.to_thread(self._poll_streams_sync)
            except Exception:
                log.exception("monitor")
            await asyncio.sleep(self.settings.monitor_interval)

    def _poll_streams_sync(self) -> None:
        """Stream gauges (and housekeeping's totals) for the metrics; trims (a sync client, in a thread)."""
        r = sync_client(self.settings.redis_url, decode_responses=True)
        try:
            if self.metrics is not None:
                streams = {S.REQUESTS: S.SCHEDULER_GROUP, S.RESULTS: S.SCHEDULER_GROUP, S.DEAD_LETTER: None}
                for wid in list(self.workers):
                    streams[S.plan_stream(wid)] = S.WORKER_GROUP
                self.metrics.poll_redis_streams(r, streams)
            now = time.monotonic()
            if now - self._last_trim > TRIM_S:
                self._last_trim = now
                safe_trim_minid(r, S.REQUESTS, S.REQUESTS_MAXLEN)
                safe_trim_minid(r, S.RESULTS, S.RESULTS_MAXLEN)
        finally:
            r.close()

    async def run(self) -> None:
        await self.connect()
        await self.lease.acquire()
        self.started_at = time.time()
        await self.recovery.bounce_workers()
        await self.recovery.recover_active()
        loops = {"lease": self.lease.keep, "monitor": self.monitor_loop, "requests": self.intake.requests_loop,
                 "results": self.step_loop.results_loop, "stats": self.stats_log.loop}
        tasks = [asyncio.create_task(self._outlasting_outages(name, fn), name=name) for name, fn in loops.items()]
        tasks.append(asyncio.create_task(serve_http(self), name="http"))
        log.info("scheduler %s up (http %s:%d)", self.instance, self.settings.scheduler_host,
                 self.settings.scheduler_port)
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait(tasks + [stop], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and t.exception() is not None:
                log.error("task %s failed: %r", t.get_name(), t.exception())
        await self._shutdown(tasks)

    async def _outlasting_outages(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the service's loops; a Redis outage longer than the client's own retries restarts
        the loop (its state lives in the service, stream positions in the consumer groups) once Redis
        answers, so the service never exits because Redis blinked."""
        outage = Outage(f"scheduler {name} loop", log, base_s=0.1, max_delay_s=2.0)
        while not self.stopping.is_set():
            try:
                await loop()
                return
            except OUTAGE_ERRORS as e:
                await asyncio.sleep(outage.failed(e))

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        self.stopping.set()
        for h in list(self.workers.values()):
            if h.task:
                h.task.cancel()
        for h in list(self.workers.values()):
            with contextlib.suppress(BaseException):
                await self.publisher.flush(h)
        for t in tasks:
            if t.get_name() != "http":
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.lease.release()
        await self.r.aclose()


def main(argv: list[str] | None = None) -> int:
    settings = SchedulerSettings.from_cli(argv)
    settings.setup_logging()

    async def _main():
        svc = SchedulerService(settings, scheduler_metrics(), freeze_pools=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, svc.stopping.set)
        await svc.run()

    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
