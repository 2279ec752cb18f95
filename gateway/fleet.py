"""The gateway's side of the Redis transport: submit / abort requests, read output deltas, see workers.

One `FleetClient` per gateway process, created in the app's lifespan and handed to routes through a
FastAPI dependency. It keeps no request state: everything lives in Redis, so replicas are equivalent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from protocol import GenerationRequest, RequestOutputDelta
from protocol import streams as S
from protocol.redis_conn import OUTAGE_ERRORS, Outage
from protocol.job_store import set_job_status
from protocol.jobs import JobMeta, JobStatus
from gateway.auth import queue_request_owners
from gateway.idempotency import Idempotency, create_once
from gateway.listing import owner_index
from gateway.output_mux import OUTAGE, OutputMux

log = logging.getLogger("pagedfleet.gateway")


async def _get(queue: asyncio.Queue, timeout_s: float):
    """queue.get() within timeout_s: asyncio.timeout where there is one (3.11+; wait_for made a task per delta)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout_s)


def job_index(owner: str) -> str:
    return owner_index("jobs", owner)


class FleetError(Exception):
    """A request could not be served (the message is shown to the client)."""

    def __init__(self, message: str, status_code: int = 500):
        super().__init__(message)
        self.status_code = status_code


@dataclass
class ModelInfo:
    name: str
    aliases: set[str]
    model_dir: Path | None
    tokenizer: object | None
    default_max_model_len: int
    vocab_size: int | None


class FleetClient:
    def __init__(self, redis: aioredis.Redis, model: ModelInfo, settings, instance: str | None = None):
        self.redis = redis
        self.instance = instance  # this process's lease (gateway/lease.py): its interactive requests carry it
        self.model = model
        self.settings = settings
        self._workers_cache: tuple[float, list[S.WorkerRegistration]] | None = None
        self._background: set[asyncio.Task] = set()
        self.mux = OutputMux(redis)

    # ---- workers --------------------------------------------------------------------------------
    async def live_workers(self, fresh: bool = False) -> list[S.WorkerRegistration]:
        now = time.monotonic()
        if not fresh and self._workers_cache and now - self._workers_cache[0] < self.settings.worker_cache_s:
            return self._workers_cache[1]
        raw = await self.redis.hgetall(S.WORKERS)
        regs: list[S.WorkerRegistration] = []
        for v in raw.values():
            try:
                regs.append(S.WorkerRegistration.model_validate_json(v))
            except Exception:  # a foreign or stale entry: not a live worker
                continue
        if regs:
            async with self.redis.pipeline(transaction=False) as p:
                for reg in regs:
                    p.get(S.heartbeat_key(reg.info.worker_id))
                beats = await p.execute()
            regs = [r for r, b in zip(regs, beats) if b == r.incarnation]
        self._workers_cache = (now, regs)
        return regs

    async def scheduler_alive(self) -> bool:
        """The scheduler service holds its lease (a key it refreshes; it expires with the scheduler)."""
        return bool(await self.redis.exists(S.SCHEDULER_INFO))

    async def max_model_len(self) -> int:
        regs = [r for r in await self.live_workers() if self.serves(r.info.model)]
        if regs:
            return min(r.info.max_model_len for r in regs)
        return self.model.default_max_model_len

    async def vocab_size(self) -> int | None:
        regs = [r for r in await self.live_workers() if self.serves(r.info.model)]
        if regs:
            return min(r.info.vocab_size for r in regs)
        return self.model.vocab_size

    def serves(self, name: str | None) -> bool:
        return name is None or name in self.model.aliases

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, req: GenerationRequest) -> None:
        """An interactive request: it ends with this process (the scheduler watches this gateway's lease)."""
        cmd = S.RequestCommand(op="add", request_id=req.request_id, request=req, gateway=self.instance)
        # no MAXLEN here: trimming (scheduler, housekeeping) never drops an entry not yet processed
        await self.redis.xadd(S.REQUESTS, S.encode(cmd))

    async def abort(self, request_id: str, reason: str = "aborted") -> None:
        cmd = S.RequestCommand(op="abort", request_id=request_id, reason=reason)
        await self.redis.xadd(S.REQUESTS, S.encode(cmd))

    def abort_soon(self, request_id: str, reason: str) -> None:
        """Abort from a context that is being cancelled (a disconnected client): a task of its own."""
        task = asyncio.get_running_loop().create_task(self._safe_abort(request_id, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _safe_abort(self, request_id: str, reason: str) -> None:
        try:
            await self.abort(request_id, reason)
        except Exception as e:  # pragma: no cover - Redis gone: the request finishes on its own
            log.warning("could not abort %s: %s", request_id, e)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def deltas(self, request_id: str, block: bool = True) -> AsyncIterator[RequestOutputDelta]:
        """The request's output deltas from the start of its stream until the finished one, read by this
        process's one reader of every followed stream (gateway/output_mux.py).

        With block=False, only what is already there (for assembling a finished job's result).
        """
        key = S.output_stream(request_id)
        queue = self.mux.follow(key) if block else None
        entries = self._queued_entries(request_id, key, queue) if queue is not None else \
            self._read_entries(request_id, key, block)
        try:
            async for fields in entries:
                delta = S.decode(fields, RequestOutputDelta)
                yield delta
                if delta.finished:
                    return
        finally:
            if queue is not None:
                self.mux.unfollow(key)
            await entries.aclose()

    async def _queued_entries(self, request_id: str, key: str, queue: asyncio.Queue) -> AsyncIterator[dict]:
        seen_output = False
        while True:
            if queue.empty():
                try:
                    item = await _get(queue, self.settings.request_timeout_s)
                except (TimeoutError, asyncio.TimeoutError):
                    raise FleetError(f"request {request_id}: no output for {self.settings.request_timeout_s:.0f} s",
                                     504) from None
            else:
                item = queue.get_nowait()
            if item is OUTAGE:  # the reader retries; this request must still be known when Redis is back
                await self._wait_for_redis(request_id, key, seen_output)
                continue
            seen_output = True
            yield item[1]

    async def _read_entries(self, request_id: str, key: str, block: bool) -> AsyncIterator[dict]:
        """The stream read by this request alone (a second follower of the same stream in this process, or
        block=False)."""
        last = "0-0"
        idle_since = time.monotonic()
        while True:
            try:
                if block:
                    resp = await self.redis.xread({key: last}, count=256, block=1000)
                else:
                    resp = await self.redis.xread({key: last}, count=1024)
            except OUTAGE_ERRORS:  # Redis away: keep our place in the stream and wait for it
                await self._wait_for_redis(request_id, key, seen_output=last != "0-0")
                idle_since = time.monotonic()
                continue
            if not resp:
                if not block:
                    return
                if time.monotonic() - idle_since > self.settings.request_timeout_s:
                    raise FleetError(
                        f"request {request_id}: no output for {self.settings.request_timeout_s:.0f} s", 504
                    )
                continue
            idle_since = time.monotonic()
            for _key, entries in resp:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields

    async def _wait_for_redis(self, request_id: str, key: str, seen_output: bool) -> None:
        """Back off until Redis answers again; then the request must still be known to it (its output
        stream or its pf:active entry), else its state was lost and the client gets a clear error. (Before
        its first output a request may still wait in the requests stream: then the request timeout rules.)"""
        outage = Outage(f"following {request_id}", log, base_s=0.1, max_delay_s=2.0)
        while True:
            try:
                known = await self.redis.exists(key) or await self.redis.hexists(S.ACTIVE, request_id)
                break
            except OUTAGE_ERRORS as e:
                await asyncio.sleep(outage.failed(e))
                if time.monotonic() - outage.started > self.settings.request_timeout_s:
                    raise FleetError("redis is unavailable", 503) from e
        outage.succeeded()
        if seen_output and not known:
            raise FleetError(f"request {request_id} was lost when Redis restarted; send it again", 503)

    # ---- jobs -----------------------------------------------------------------------------------
    async def create_job(self, meta: JobMeta, request: GenerationRequest, owner: str = "",
                         idem: Idempotency | None = None) -> tuple[str, bool]:
        """Record the job and put its request on the requests stream in one transaction, so a gateway that
        dies mid-way leaves no job that never runs. `owner`: the hash of the caller's API key
        (gateway/auth.py), "" when the API is open. With `idem`, a job already made with that key is
        returned instead: (its id, True); else (meta.job_id, False)."""
        key = S.job_key(meta.job_id)
        now = repr(time.time())
        ttl_s = meta.ttl_s * 2 + 3600  # a backstop: housekeeping deletes finished jobs after their TTL
        cmd = S.RequestCommand(op="add", request_id=request.request_id, request=request, job_id=meta.job_id)

        def queue(p) -> None:
            p.hset(key, mapping={"meta": meta.model_dump_json(), "status": JobStatus.QUEUED.value,
                                 "updated_at": now, "owner": owner})
            p.zadd(job_index(owner), {meta.job_id: meta.created_at})
            p.zremrangebyscore(job_index(owner), "-inf", meta.created_at - ttl_s)  # long gone
            p.expire(job_index(owner), ttl_s)
            p.expire(key, ttl_s)
            queue_request_owners(p, meta.ttl_s, owner, [request.request_id])
            p.xadd(S.REQUESTS, S.encode(cmd))

        return await create_once(self.redis, idem, meta.job_id, queue, ttl_s)

    async def get_job(self, job_id: str) -> dict | None:
        raw = await self.redis.hgetall(S.job_key(job_id))
        return raw or None

    async def set_job_status(self, job_id: str, status: JobStatus, error: str | None = None) -> bool:
        return bool(await set_job_status(self.redis, job_id, status, error))

    async def store_job_result(self, job_id: str, result: dict, ttl_s: int) -> None:
        key = S.job_key(job_id)
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(key, "result", json.dumps(result))
            p.expire(key, ttl_s * 2 + 3600)
            p.expire(S.output_stream(job_id), ttl_s * 2 + 3600)
            await p.execute()

    async def aclose(self) -> None:
        await self.mux.aclose()
        for t in list(self._background):
            t.cancel()
        await self.redis.aclose()
