"""The scheduler service: `python -m scheduler.service` (one per fleet).

It reads GenerationRequests from the requests stream (consumer group ``scheduler``), keeps one
``Scheduler`` (block ledger) per registered worker, and runs the iteration-level loop of every worker
concurrently (one asyncio task each): schedule -> StepPlan on ``pf:plan:{worker}`` -> wait for its
StepResult on ``pf:results`` -> ``Scheduler.update`` -> RequestOutputDeltas on ``pf:out:{request}``.

Placement: a new request goes to the live worker where it fits best (it fits in the free blocks, then
the longest prefix-cache hit, then the shortest queue, then the most free blocks).

Failure handling: workers heartbeat (``pf:hb:{worker}``, a key with a TTL holding their incarnation).
A worker whose key expired (or whose incarnation changed) is declared dead: its Scheduler is dropped
and each of its unfinished requests is re-added elsewhere with the tokens it already generated
(recompute), so it continues where it stopped. Accepted requests are kept in ``pf:active`` until they
finish, so a restarted scheduler resumes them too. Nothing is acknowledged before its effect is
recorded (an accepted request is in ``pf:active`` in the same transaction as its XACK; a StepResult is
acknowledged in the transaction that publishes its deltas).

HTTP (``--http-port``, 8001): /metrics, /sd (Prometheus http_sd of the live workers' metrics),
/block-map (``Scheduler.block_map()`` per worker), /v1/workers, /stats, /health.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from protocol import FinishReason, GenerationRequest, RequestOutputDelta, SequenceOutputDelta, StepPlan, StepResult
from protocol import streams as S

log = logging.getLogger("pagedfleet.scheduler")


class WorkerDead(Exception):
    pass


def _log_failed_write(worker_id: str, fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("writing the outputs of a step of worker %s failed: %r", worker_id, fut.exception())


@dataclass
class ReqState:
    request: GenerationRequest
    job_id: str | None = None
    worker_id: str | None = None
    generated: dict[int, list[int]] = field(default_factory=dict)
    finished_idx: set[int] = field(default_factory=set)
    resumes: int = 0
    status: str = "queued"
    aborted: bool = False
    started: bool = False
    received_at: float = field(default_factory=time.time)  # when this scheduler read it (wall clock)
    queue_observed: bool = False  # its queue time (arrival to first StepPlan) is in the histogram
    publishing: asyncio.Future | None = None  # the Redis writes of its latest deltas, while still running

    @property
    def request_id(self) -> str:
        return self.request.request_id


class WorkerHandle:
    def __init__(self, reg: S.WorkerRegistration, sched: Any):
        self.reg = reg
        self.wid = reg.info.worker_id
        self.sched = sched
        self.requests: set[str] = set()
        self.wake = asyncio.Event()
        # wire step ids are unique across scheduler restarts, so a stale StepResult never matches
        self.step_offset = int(time.time() * 1000) * 1000 + random.randrange(1000)
        self.waiter: tuple[int, asyncio.Future] | None = None
        self.dead = False
        self.task: asyncio.Task | None = None
        self.steps = 0
        self.last_stats: dict = {}
        # the Redis writes of this worker's last step (its deltas and the StepResult ack), running while the
        # worker executes the next step; awaited before the next step's writes, so they stay in order
        self.publishing: asyncio.Future | None = None


class SchedulerService:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.instance = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.r: aioredis.Redis | None = None
        self.workers: dict[str, WorkerHandle] = {}
        self.requests: dict[str, ReqState] = {}
        self.orphans: list[ReqState] = []  # unfinished requests waiting for a live worker
        self.stopping = asyncio.Event()
        self.metrics = None
        self._tasks: list[asyncio.Task] = []
        self._have_worker = asyncio.Event()
        self._last_trim = 0.0
        self._expected_workers: set[str] = set()
        self.started_at = time.time()

    # ================================================================================ setup
    def scheduler_config(self, info):
        from scheduler.scheduler import SchedulerConfig

        a = self.args
        return SchedulerConfig(
            max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
            enable_chunked_prefill=not a.no_chunked_prefill, enable_prefix_caching=not a.no_prefix_caching,
            policy=a.policy, preemption_mode=a.preemption_mode, max_model_len=a.max_model_len,
        )

    def new_scheduler(self, info):
        from scheduler.scheduler import Scheduler

        return Scheduler(self.scheduler_config(info), info)

    async def connect(self) -> None:
        self.r = aioredis.Redis.from_url(self.args.redis_url, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.r.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for stream, gid in ((S.REQUESTS, "0"), (S.RESULTS, "$")):
            try:
                await self.r.xgroup_create(stream, S.SCHEDULER_GROUP, id=gid, mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        try:
            from scheduler.metrics import scheduler_metrics

            self.metrics = scheduler_metrics()
        except Exception as e:  # pragma: no cover
            log.warning("metrics unavailable: %s", e)

    async def acquire_lease(self) -> None:
        """One scheduler at a time: a lease key refreshed every second."""
        while not self.stopping.is_set():
            ok = await self.r.set(S.SCHEDULER_INFO, self.instance, nx=True, px=int(self.args.lease_ttl * 1000))
            if ok:
                return
            holder = await self.r.get(S.SCHEDULER_INFO)
            log.warning("another scheduler (%s) holds the lease; waiting", holder)
            await asyncio.sleep(1.0)

    async def lease_loop(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.args.lease_ttl / 4)
            holder = await self.r.get(S.SCHEDULER_INFO)
            if holder not in (None, self.instance):
                log.error("lost the scheduler lease to %s; stopping", holder)
                self.stopping.set()
                return
            await self.r.set(S.SCHEDULER_INFO, self.instance, px=int(self.args.lease_ttl * 1000))

    # ================================================================================ workers
    async def monitor_loop(self) -> None:
        last_poll = 0.0
        while not self.stopping.is_set():
            try:
                await self.check_workers()
                await self.place_orphans()
                now = time.monotonic()
                if now - last_poll > 2.0:
                    last_poll = now
                    await asyncio.to_thread(self._poll_streams_sync)
            except Exception:
                log.exception("monitor")
            await asyncio.sleep(self.args.monitor_interval)

    async def check_workers(self) -> None:
        raw = await self.r.hgetall(S.WORKERS)
        regs: dict[str, S.WorkerRegistration] = {}
        for wid, v in raw.items():
            try:
                regs[wid] = S.WorkerRegistration.model_validate_json(v)
            except Exception:
                log.warning("ignoring a malformed registration of %s", wid)
        wids = sorted(set(regs) | set(self.workers))
        beats = {}
        if wids:
            async with self.r.pipeline(transaction=False) as p:
                for wid in wids:
                    p.get(S.heartbeat_key(wid))
                vals = await p.execute()
            beats = dict(zip(wids, vals))
        # deaths: the heartbeat expired, the registration vanished, or a new incarnation replaced it
        for wid, h in list(self.workers.items()):
            reg = regs.get(wid)
            if beats.get(wid) != h.reg.incarnation or reg is None or reg.incarnation != h.reg.incarnation:
                await self.declare_dead(h, "missed heartbeats" if beats.get(wid) != h.reg.incarnation
                                        else "re-registered")
        # births
        for wid, reg in regs.items():
            if wid in self.workers or beats.get(wid) != reg.incarnation:
                continue
            await self.add_worker(reg)
        if self.metrics is not None:
            for wid, h in self.workers.items():
                self.metrics.set_worker_up(wid, h.reg.info.model, True, 0.0)

    async def add_worker(self, reg: S.WorkerRegistration) -> None:
        try:
            sched = self.new_scheduler(reg.info)
        except Exception as e:
            log.error("cannot build a Scheduler for worker %s: %s", reg.info.worker_id, e)
            return
        h = WorkerHandle(reg, sched)
        self.workers[h.wid] = h
        if self.metrics is not None:
            self.metrics.register_worker(reg.info)
        log.info("worker %s registered: %d GPU blocks, %d CPU blocks, max_model_len %d", h.wid,
                 reg.info.num_gpu_blocks, reg.info.num_cpu_blocks, reg.info.max_model_len)
        h.task = asyncio.create_task(self.worker_loop(h), name=f"worker-{h.wid}")
        self._have_worker.set()
        await self.place_orphans()

    async def place_orphans(self) -> None:
        """Place requests that wait for a worker. Right after a restart, wait (a few seconds at most) for the
        workers that were there before to come back, so the requests spread over all of them."""
        if not self.orphans or not self.workers:
            return
        missing = self._expected_workers - set(self.workers)
        if missing and time.time() < self.started_at + self.args.rejoin_grace:
            return
        orphans, self.orphans = self.orphans, []
        for st in orphans:
            await self.place(st, resume=True)

    async def declare_dead(self, h: WorkerHandle, why: str) -> None:
        if h.dead:
            return
        h.dead = True
        log.warning("worker %s declared dead (%s); resuming its %d requests elsewhere", h.wid, why, len(h.requests))
        self.workers.pop(h.wid, None)
        if not self.workers:
            self._have_worker.clear()
        if h.waiter is not None and not h.waiter[1].done():
            h.waiter[1].set_exception(WorkerDead(h.wid))
        h.wake.set()
        if h.task is not None:
            h.task.cancel()
            with contextlib.suppress(BaseException):
                await h.task
        with contextlib.suppress(Exception):  # its last step's deltas reach the clients before any resume
            await self._flush_publishing(h)  # (a failure was logged when it happened)
        # forget it in Redis (only if that registration is still the dead one)
        cur = await self.r.hget(S.WORKERS, h.wid)
        async with self.r.pipeline(transaction=True) as p:
            if cur is not None and S.WorkerRegistration.model_validate_json(cur).incarnation == h.reg.incarnation:
                p.hdel(S.WORKERS, h.wid)
                p.delete(S.plan_stream(h.wid))
            await p.execute()
        if self.metrics is not None:
            self.metrics.set_worker_up(h.wid, h.reg.info.model, False)
        for rid in sorted(h.requests, key=lambda x: self.requests[x].request.arrival_time if x in self.requests else 0):
            st = self.requests.get(rid)
            if st is None:
                continue
            st.worker_id = None
            if st.aborted:
                await self.finish_locally(st, FinishReason.ABORT, None)
                continue
            st.resumes += 1
            if st.resumes > self.args.max_resumes:
                await self.finish_locally(st, FinishReason.ERROR,
                                          f"request lost {st.resumes} workers (last: {h.wid}); giving up")
                continue
            if st.started and self.metrics is not None:
                # it ran there and resumes elsewhere by recompute: a preemption of the lost worker
                self.metrics.inc_preemption(h.wid, "recompute", "worker_lost", model=h.reg.info.model)
            await self.place(st, resume=True)
        h.requests.clear()

    # ================================================================================ placement
    @staticmethod
    def _blocks_free(h: WorkerHandle) -> int:
        """Blocks a new request can take: free ones, cached-but-evictable included."""
        try:
            return int(h.sched.kv.gpu.num_free_blocks)
        except AttributeError:
            st = h.sched.stats()
            return int(st.get("gpu_blocks_available", st.get("gpu_blocks_free", h.reg.info.num_gpu_blocks)))

    @staticmethod
    def _queue_len(h: WorkerHandle) -> int:
        groups = getattr(h.sched, "groups", None)
        return len(groups) if groups is not None else len(h.requests)

    @staticmethod
    def _prefix_hit(h: WorkerHandle, tokens: list[int]) -> int:
        """Prompt tokens this worker's prefix cache already holds."""
        try:
            from scheduler.sequence import Sequence

            probe = Sequence(-1, "", tokens, len(tokens))
            return len(h.sched.kv.find_cached_prefix(probe)) * h.reg.info.block_size
        except Exception:
            return 0

    def rank_workers(self, st: ReqState) -> list[WorkerHandle]:
        """Live workers in order of preference for a request: those where it fits in the free blocks
        first; among them the longest prefix-cache hit, unless that worker's queue is more than
        ``--max-queue-imbalance`` requests longer than the shortest; then the shortest queue; then the
        most free blocks. Workers whose context is too short for it are left out."""
        tokens = st.request.prompt_token_ids
        length = len(tokens) + max((len(v) for v in st.generated.values()), default=0)
        rows = []
        for h in self.workers.values():
            if h.dead or length >= h.reg.info.max_model_len:
                continue
            bs = h.reg.info.block_size
            need = math.ceil((length + 1) / bs) + (st.request.sampling.n - 1)
            free = self._blocks_free(h)
            rows.append((h, free >= need, self._prefix_hit(h, tokens) // bs, self._queue_len(h), free))
        if not rows:
            return []
        min_q = min(r[3] for r in rows)
        cap = self.args.max_queue_imbalance

        def key(r):
            _h, fits, hit, q, free = r
            return (fits, hit if q <= min_q + cap else 0, -q, free)

        return [r[0] for r in sorted(rows, key=key, reverse=True)]

    async def place(self, st: ReqState, resume: bool = False) -> bool:
        """Add the request to the best worker's Scheduler that takes it. Returns False if it failed for good."""
        ranked = self.rank_workers(st)
        if not ranked:
            if not self.workers:
                self.orphans.append(st)
                return True
            await self.finish_locally(st, FinishReason.ERROR, "prompt does not fit the context of any live worker")
            return False
        error = None
        for h in ranked:
            try:
                if resume and st.generated:
                    self._resume_on(h, st)
                else:
                    h.sched.add_request(st.request)
            except ValueError as e:
                error = error or str(e)
                continue
            st.worker_id = h.wid
            h.requests.add(st.request_id)
            if st.job_id and st.status != "queued":
                st.status = "queued"
            h.wake.set()
            if resume:
                await self.r.hset(S.ACTIVE, st.request_id, self._active(st).model_dump_json())
                log.info("request %s resumed on %s (%d tokens already generated)", st.request_id, h.wid,
                         sum(len(v) for v in st.generated.values()))
            return True
        await self.finish_locally(st, FinishReason.ERROR, error)
        return False

    def _resume_on(self, h: WorkerHandle, st: ReqState) -> None:
        """Re-add a request that already generated tokens (recompute from prompt + those tokens)."""
        n = st.request.sampling.n
        generated = [st.generated.get(i, []) for i in range(n)]
        h.sched.resume_request(st.request, generated, sorted(st.finished_idx))

    def _active(self, st: ReqState) -> S.ActiveRequest:
        return S.ActiveRequest(request=st.request, job_id=st.job_id, worker_id=st.worker_id, resumes=st.resumes)

    # ================================================================================ requests
    async def requests_loop(self) -> None:
        # entries delivered to us before a restart and not acknowledged come first
        backlog = True
        while not self.stopping.is_set():
            if not self.workers:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._have_worker.wait(), timeout=1.0)
                continue
            try:
                resp = await self.r.xreadgroup(S.SCHEDULER_GROUP, "scheduler", {S.REQUESTS: "0" if backlog else ">"},
                                               count=256, block=None if backlog else 1000)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    await self.r.xgroup_create(S.REQUESTS, S.SCHEDULER_GROUP, id="0", mkstream=True)
                    continue
                raise
            entries = resp[0][1] if resp else []
            if backlog and not entries:
                backlog = False
                continue
            for entry_id, fields in entries:
                deliveries = 1
                if backlog:  # delivered before (to us, before a restart): maybe it is what killed us
                    info = await self.r.xpending_range(S.REQUESTS, S.SCHEDULER_GROUP, min=entry_id, max=entry_id,
                                                       count=1)
                    deliveries = int(info[0]["times_delivered"]) if info else 1
                await self.handle_request_entry(entry_id, fields, deliveries)

    async def handle_request_entry(self, entry_id: str, fields: dict, deliveries: int = 1) -> None:
        try:
            cmd = S.decode(fields, S.RequestCommand)
        except Exception as e:
            await self.dead_letter(S.REQUESTS, entry_id, fields, f"malformed request entry: {e}")
            return
        total = cmd.deliveries + deliveries
        if total > self.args.max_deliveries and cmd.op == "add" and cmd.request_id not in self.requests:
            await self.dead_letter(S.REQUESTS, entry_id, fields,
                                   f"request {cmd.request_id} was delivered {total} times without being processed; "
                                   f"moved to the dead-letter stream", cmd.request_id, total, cmd.job_id)
            return
        if cmd.op == "abort":
            await self.abort(cmd.request_id, cmd.reason or "aborted")
            await self.r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
            return
        if cmd.request is None:
            await self.dead_letter(S.REQUESTS, entry_id, fields, "add without a request", cmd.request_id)
            return
        rid = cmd.request_id
        if rid in self.requests or await self.r.hexists(S.ACTIVE, rid):
            await self.r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)  # a redelivery: already accepted
            return
        if await self.r.exists(S.output_stream(rid)):
            # finished before (its output stream exists): a duplicate from a reclaimed entry
            await self.r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
            return
        req = cmd.request
        if req.sampling.seed is None:
            # fix the seed now so a resumed request samples exactly what it would have
            req = req.model_copy(update={"sampling": req.sampling.model_copy(update={"seed": random.getrandbits(62)})})
        st = ReqState(request=req, job_id=cmd.job_id)
        self.requests[rid] = st
        ok = await self.place(st)
        if ok and rid in self.requests:
            async with self.r.pipeline(transaction=True) as p:
                p.hset(S.ACTIVE, rid, self._active(st).model_dump_json())
                p.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
                await p.execute()
        else:
            await self.r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)

    async def abort(self, rid: str, reason: str) -> None:
        st = self.requests.get(rid)
        if st is None:
            return
        st.aborted = True
        h = self.workers.get(st.worker_id) if st.worker_id else None
        if h is not None and not h.dead and h.sched.abort_request(rid):
            # freed in the next plan; the final delta (finish_reason abort) comes out of the next update()
            h.wake.set()
            return
        if st in self.orphans:
            self.orphans.remove(st)
        await self.finish_locally(st, FinishReason.ABORT, None)

    async def finish_locally(self, st: ReqState, reason: FinishReason, error: str | None) -> None:
        """Publish a final delta for a request no Scheduler will report on, and forget it (after any of its
        deltas still being written, so the final one comes last)."""
        if st.publishing is not None:
            with contextlib.suppress(Exception):  # a failed write was logged; the final delta still goes out
                await asyncio.shield(st.publishing)
            if self.requests.get(st.request_id) is not st:
                return  # that write was its final delta (it finished on the worker meanwhile)
        n = st.request.sampling.n
        outs = [SequenceOutputDelta(index=i, finish_reason=reason) for i in range(n) if i not in st.finished_idx]
        delta = RequestOutputDelta(request_id=st.request_id, outputs=outs, finished=True, error=error,
                                   num_prompt_tokens=len(st.request.prompt_token_ids))
        async with self.r.pipeline(transaction=True) as p:
            self._publish(p, delta, st)
            await p.execute()
        self._forget(st)

    def _forget(self, st: ReqState) -> None:
        self.requests.pop(st.request_id, None)
        if st.worker_id and st.worker_id in self.workers:
            self.workers[st.worker_id].requests.discard(st.request_id)

    def _publish(self, p, delta: RequestOutputDelta, st: ReqState | None) -> None:
        key = S.output_stream(delta.request_id)
        p.xadd(key, S.encode(delta))
        if delta.finished:
            ttl = self.args.job_ttl if (st and st.job_id) else self.args.output_ttl
            p.expire(key, int(ttl))
            p.hdel(S.ACTIVE, delta.request_id)
            if st is not None and st.job_id:
                if delta.error:
                    status = S.JobStatus.FAILED
                elif all(o.finish_reason == FinishReason.ABORT for o in delta.outputs) and delta.outputs:
                    status = S.JobStatus.CANCELLED
                else:
                    status = S.JobStatus.COMPLETED
                S.set_job_status(p, st.job_id, status, delta.error)

    async def dead_letter(self, stream: str, entry_id: str, fields: dict, reason: str,
                          request_id: str | None = None, deliveries: int = 1, job_id: str | None = None) -> None:
        dl = S.DeadLetter(stream=stream, group=S.SCHEDULER_GROUP, entry_id=entry_id, deliveries=deliveries,
                          payload=S.raw_payload(fields), reason=reason)
        log.error("dead-lettering %s %s: %s", stream, entry_id, reason)
        async with self.r.pipeline(transaction=True) as p:
            p.xadd(S.DEAD_LETTER, S.encode(dl), maxlen=S.DEAD_MAXLEN, approximate=True)
            p.xack(stream, S.SCHEDULER_GROUP, entry_id)
            if request_id:
                delta = RequestOutputDelta(request_id=request_id, finished=True, error=reason)
                self._publish(p, delta, None)
                if job_id:
                    S.set_job_status(p, job_id, S.JobStatus.FAILED, reason)
            await p.execute()
        if self.metrics is not None:
            self.metrics.inc_dead_lettered(stream)

    # ================================================================================ results
    async def results_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                resp = await self.r.xreadgroup(S.SCHEDULER_GROUP, "scheduler", {S.RESULTS: ">"}, count=64,
                                               block=1000)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    await self.r.xgroup_create(S.RESULTS, S.SCHEDULER_GROUP, id="$", mkstream=True)
                    continue
                raise
            if not resp:
                continue
            stale = []
            for entry_id, fields in resp[0][1]:
                try:
                    res = S.decode(fields, StepResult)
                except Exception as e:
                    await self.dead_letter(S.RESULTS, entry_id, fields, f"malformed StepResult: {e}")
                    continue
                h = self.workers.get(res.worker_id)
                if h is None or h.waiter is None or h.waiter[0] != res.step_id or h.waiter[1].done():
                    stale.append(entry_id)  # a dead worker's or an earlier scheduler's step
                    continue
                h.waiter[1].set_result((res, entry_id))
            if stale:
                await self.r.xack(S.RESULTS, S.SCHEDULER_GROUP, *stale)

    # ================================================================================ the loop
    async def worker_loop(self, h: WorkerHandle) -> None:
        try:
            await self._worker_loop(h)
        except (asyncio.CancelledError, WorkerDead):
            pass
        except Exception:
            log.exception("worker loop %s crashed", h.wid)
            await self.declare_dead(h, "scheduler loop error")

    async def _worker_loop(self, h: WorkerHandle) -> None:
        sched = h.sched
        loop = asyncio.get_running_loop()
        plan_key = S.plan_stream(h.wid)
        model = h.reg.info.model
        while not h.dead and not self.stopping.is_set():
            if not sched.has_unfinished_requests():
                h.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(h.wake.wait(), timeout=1.0)
                continue
            t0 = time.perf_counter()
            plan: StepPlan = sched.schedule()
            t_sched = time.perf_counter() - t0
            if plan.is_empty and not plan.new_sequences and not plan.forks:
                # nothing for the worker: collect what the Scheduler has to say (aborts) without a round trip
                deltas = sched.update(StepResult(worker_id=h.wid, step_id=plan.step_id))
                if deltas:
                    await self._apply_deltas(h, deltas, None)
                else:
                    h.wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(h.wake.wait(), timeout=0.05)
                continue
            wire_step = h.step_offset + h.steps
            h.steps += 1
            internal_step = plan.step_id
            plan.worker_id = h.wid
            plan.step_id = wire_step
            fut = loop.create_future()
            h.waiter = (wire_step, fut)
            self._note_plan(h, plan)
            t1 = time.perf_counter()
            await self.r.xadd(plan_key, S.encode(plan), maxlen=S.PLAN_MAXLEN, approximate=True)
            res, entry_id = await fut
            rtt = time.perf_counter() - t1
            h.waiter = None
            res.step_id = internal_step
            if res.error:
                log.error("worker %s failed step %s: %s", h.wid, wire_step, res.error)
            t2 = time.perf_counter()
            deltas = sched.update(res)  # a failed step finishes its requests with the error
            await self._apply_deltas(h, deltas, entry_id)
            t_update = time.perf_counter() - t2
            if self.metrics is not None:
                ex = res.execute_ms / 1000.0
                self.metrics.observe_plan(h.wid, plan, model)
                self.metrics.observe_step(h.wid, t_sched, max(0.0, rtt - ex), ex, batch_size=len(plan.scheduled),
                                          batched_tokens=plan.num_batched_tokens, model=model, update_s=t_update)
                if h.steps % 8 == 0 or not sched.has_unfinished_requests():
                    self.metrics.update_ledger(h.wid, model, sched.stats())

    def _note_plan(self, h: WorkerHandle, plan: StepPlan) -> None:
        for ns in plan.new_sequences:
            st = self.requests.get(ns.request_id)
            if st is not None:
                st.started = True
                if not st.queue_observed:
                    st.queue_observed = True
                    if self.metrics is not None:
                        self.metrics.observe_queue_time(h.wid, self._queue_time(st), h.reg.info.model)
                if st.job_id and st.status != "running":
                    st.status = "running"
                    self._spawn(S.set_job_status(self.r, st.job_id, S.JobStatus.RUNNING))
        if self.args.track_preemption:
            self._note_preemptions(h)

    @staticmethod
    def _queue_time(st: ReqState) -> float:
        """Seconds from the request's arrival (the gateway's ``arrival_time``, wall clock) to now, its first
        StepPlan. Without a usable arrival time (none, or ahead of this clock), from when this scheduler
        read it."""
        now = time.time()
        arrival = st.request.arrival_time
        start = arrival if 0 < arrival <= now else st.received_at
        return max(0.0, now - start)

    def _note_preemptions(self, h: WorkerHandle) -> None:
        """Job status: running / preempted (swapped out, or waiting again after a recompute preemption)."""
        groups = getattr(h.sched, "groups", None)
        if groups is None:
            return
        for rid in h.requests:
            st = self.requests.get(rid)
            if st is None or not st.job_id or not st.started:
                continue
            g = groups.get(rid)
            if g is None:
                continue
            s = getattr(g.status, "value", g.status)
            new = "preempted" if s in ("swapped", "waiting") else "running" if s == "running" else None
            if new and new != st.status:
                st.status = new
                self._spawn(S.set_job_status(self.r, st.job_id, S.JobStatus(new)))

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.append(t)
        t.add_done_callback(lambda x: self._tasks.remove(x) if x in self._tasks else None)

    async def _apply_deltas(self, h: WorkerHandle, deltas: list[RequestOutputDelta], entry_id: str | None) -> None:
        """Take a step's tokens into the request states now (the next plan and any recovery see them) and
        write the deltas (with the StepResult's ack) in the background: encoding and writing a delta per
        running request costs milliseconds per step, which the worker would otherwise sit idle through.

        The writes of a worker's steps form a chain (each waits for the one before), registered before this
        coroutine awaits anything, so cancelling the worker's loop never drops one. Finished requests are
        forgotten only once their final delta is written: if a write fails they are still tracked, and the
        worker's loop fails on its next step (as a failed write used to fail it at once)."""
        states = []
        for d in deltas:
            st = self.requests.get(d.request_id)
            if st is not None:
                for o in d.outputs:
                    if o.token_ids:
                        st.generated.setdefault(o.index, []).extend(o.token_ids)
                    if o.finish_reason is not None:
                        st.finished_idx.add(o.index)
            states.append(st)
        prev = h.publishing
        if deltas or entry_id is not None:
            fut = asyncio.ensure_future(self._publish_step(h, prev, deltas, states, entry_id))
            fut.add_done_callback(functools.partial(_log_failed_write, h.wid))
            h.publishing = fut
            for st in states:
                if st is not None:
                    st.publishing = fut
        if prev is not None:  # at most one step's writes behind: normally done while this step ran
            await asyncio.shield(prev)

    async def _publish_step(self, h: WorkerHandle, prev: asyncio.Future | None, deltas: list[RequestOutputDelta],
                            states: list[ReqState | None], entry_id: str | None) -> None:
        if prev is not None:
            await prev  # in order; if it failed, so does this (the worker's loop is failing already)
        async with self.r.pipeline(transaction=True) as p:
            for d, st in zip(deltas, states):
                self._publish(p, d, st)
            if entry_id is not None:
                p.xack(S.RESULTS, S.SCHEDULER_GROUP, entry_id)
            await p.execute()
        me = asyncio.current_task()
        for d, st in zip(deltas, states):
            if st is None:
                continue
            if st.publishing is me:
                st.publishing = None
            if d.finished:
                self._forget(st)
                h.requests.discard(st.request_id)
        if h.publishing is me:
            h.publishing = None

    @staticmethod
    async def _flush_publishing(h: WorkerHandle | None) -> None:
        """Wait for the worker's pending step writes (raises what they raised)."""
        pending = h.publishing if h is not None else None
        if pending is not None:
            await asyncio.shield(pending)  # a cancelled waiter (a worker loop being stopped) leaves it running

    # ================================================================================ recovery
    async def bounce_workers(self) -> None:
        """Workers registered before this scheduler started hold sequences of a previous scheduler: remove
        their registrations; they notice, drop every sequence and register again as new incarnations."""
        cad = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
        for wid, v in (await self.r.hgetall(S.WORKERS)).items():
            try:
                reg = S.WorkerRegistration.model_validate_json(v)
            except Exception:
                reg = None
            if reg is None or reg.registered_at < self.started_at:
                await self.r.eval(cad, 1, S.WORKERS, wid, v)
                self._expected_workers.add(wid)
                log.info("worker %s predates this scheduler: asked it to register again", wid)

    async def recover_active(self) -> None:
        """Requests a previous scheduler accepted and did not finish: resume them (from their outputs)."""
        raw = await self.r.hgetall(S.ACTIVE)
        if not raw:
            return
        log.warning("recovering %d unfinished requests of a previous scheduler", len(raw))
        for rid, v in raw.items():
            try:
                act = S.ActiveRequest.model_validate_json(v)
            except Exception:
                await self.r.hdel(S.ACTIVE, rid)
                continue
            st = ReqState(request=act.request, job_id=act.job_id, resumes=act.resumes + 1)
            finished = False
            started = False
            for _id, fields in await self.r.xrange(S.output_stream(rid)):
                d = S.decode(fields, RequestOutputDelta)
                started = True  # the previous scheduler scheduled it (and observed its queue time)
                for o in d.outputs:
                    st.generated.setdefault(o.index, []).extend(o.token_ids)
                    if o.finish_reason is not None:
                        st.finished_idx.add(o.index)
                finished = finished or d.finished
            if finished:
                await self.r.hdel(S.ACTIVE, rid)
                continue
            st.queue_observed = started
            self.requests[rid] = st
            self.orphans.append(st)

    # ================================================================================ housekeeping
    def _poll_streams_sync(self) -> None:
        import redis as sync_redis

        r = sync_redis.Redis.from_url(self.args.redis_url, decode_responses=True)
        try:
            if self.metrics is not None:
                streams = {S.REQUESTS: S.SCHEDULER_GROUP, S.RESULTS: S.SCHEDULER_GROUP, S.DEAD_LETTER: None}
                for wid in list(self.workers):
                    streams[S.plan_stream(wid)] = S.WORKER_GROUP
                self.metrics.poll_redis_streams(r, streams)
                # counts kept by Celery housekeeping (another process): totals in a hash
                for k, v in (r.hgetall(S.PREFIX + "housekeeping:stats") or {}).items():
                    kind, _, rest = k.partition(":")
                    if kind == "reclaimed" and rest.count(":") >= 1:
                        stream, _, group = rest.rpartition(":")
                        self.metrics.update_queue_totals(stream, group, reclaimed_total=float(v))
                    elif kind == "dead" and rest:
                        self.metrics.update_queue_totals(rest, dead_lettered_total=float(v))
            now = time.monotonic()
            if now - self._last_trim > 10:
                self._last_trim = now
                S.safe_trim_minid(r, S.REQUESTS, S.REQUESTS_MAXLEN)
                S.safe_trim_minid(r, S.RESULTS, S.RESULTS_MAXLEN)
        finally:
            r.close()

    # ================================================================================ HTTP
    def workers_json(self) -> list[dict]:
        out = []
        for wid, h in self.workers.items():
            out.append({"worker_id": wid, "model": h.reg.info.model, "metrics_address": h.reg.metrics_url,
                        "incarnation": h.reg.incarnation, "info": h.reg.info.model_dump(),
                        "requests": len(h.requests), "steps": h.steps, "stats": _jsonable(h.sched.stats())})
        return out

    def block_map(self) -> dict:
        workers = []
        for wid, h in self.workers.items():
            fn = getattr(h.sched, "block_map", None)
            entry = dict(fn()) if fn is not None else {}
            entry.setdefault("worker_id", wid)
            entry.setdefault("model", h.reg.info.model)
            workers.append(_jsonable(entry))
        return {"workers": workers}

    def build_http_app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI(title="PagedFleet scheduler")
        try:
            from scheduler.metrics import make_scheduler_http_router

            app.include_router(make_scheduler_http_router(workers=self.workers_json, block_map=self.block_map))
        except Exception:  # pragma: no cover
            pass

        @app.get("/v1/workers")
        def workers() -> dict:
            return {"workers": self.workers_json()}

        @app.get("/block-map/{worker_id}")
        def block_map_one(worker_id: str):
            for w in self.block_map()["workers"]:
                if w.get("worker_id") == worker_id:
                    return w
            return JSONResponse({"error": f"no live worker {worker_id!r}"}, status_code=404)

        @app.get("/stats")
        def stats() -> dict:
            return {"workers": {wid: _jsonable(h.sched.stats()) for wid, h in self.workers.items()},
                    "requests": len(self.requests), "orphans": len(self.orphans),
                    "request_ids": sorted(self.requests)[:100],
                    "worker_requests": {wid: sorted(h.requests)[:100] for wid, h in self.workers.items()}}

        @app.get("/health")
        def health():
            ok = bool(self.workers)
            return JSONResponse({"status": "ok" if ok else "no workers", "workers": len(self.workers)},
                                status_code=200 if ok else 503)

        return app

    async def serve_http(self) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the service handles signals itself
                yield

        cfg = uvicorn.Config(self.build_http_app(), host=self.args.http_host, port=self.args.http_port,
                             log_level="warning", lifespan="off")
        server = _Server(cfg)
        task = asyncio.create_task(server.serve())
        await self.stopping.wait()
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout=3)

    # ================================================================================ main
    async def run(self) -> None:
        await self.connect()
        await self.acquire_lease()
        self.started_at = time.time()
        await self.bounce_workers()
        await self.recover_active()
        tasks = [
            asyncio.create_task(self.lease_loop(), name="lease"),
            asyncio.create_task(self.monitor_loop(), name="monitor"),
            asyncio.create_task(self.requests_loop(), name="requests"),
            asyncio.create_task(self.results_loop(), name="results"),
            asyncio.create_task(self.serve_http(), name="http"),
        ]
        log.info("scheduler %s up (http :%d)", self.instance, self.args.http_port)
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait(tasks + [stop], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and t.exception() is not None:
                log.error("task %s failed: %r", t.get_name(), t.exception())
        self.stopping.set()
        for h in list(self.workers.values()):
            if h.task:
                h.task.cancel()
        for h in list(self.workers.values()):
            with contextlib.suppress(BaseException):
                await self._flush_publishing(h)
        for t in tasks:
            if t.get_name() != "http":
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            if await self.r.get(S.SCHEDULER_INFO) == self.instance:
                await self.r.delete(S.SCHEDULER_INFO)
        await self.r.aclose()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "value"):
        return x.value
    return str(x)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m scheduler.service", description="PagedFleet scheduler service")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--http-host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=int(env("PAGEDFLEET_SCHEDULER_PORT", "8001")))
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument("--preemption-mode", default="auto", choices=["auto", "swap", "recompute"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--monitor-interval", type=float, default=0.25, help="seconds between liveness checks")
    p.add_argument("--max-resumes", type=int, default=3, help="a request that loses more workers fails")
    p.add_argument("--max-queue-imbalance", type=int, default=4,
                   help="a prefix-cache hit wins placement only if that worker's queue is at most this much longer")
    p.add_argument("--max-deliveries", type=int, default=int(env("PAGEDFLEET_MAX_DELIVERIES", "5")),
                   help="a request entry delivered more often (the scheduler kept dying on it) is dead-lettered")
    p.add_argument("--output-ttl", type=float, default=float(env("PAGEDFLEET_OUTPUT_TTL_S", "600")))
    p.add_argument("--job-ttl", type=float, default=float(env("PAGEDFLEET_JOB_TTL", "86400")))
    p.add_argument("--lease-ttl", type=float, default=5.0)
    p.add_argument("--rejoin-grace", type=float, default=5.0,
                   help="after a restart, seconds to wait for the known workers before placing requests")
    p.add_argument("--no-track-preemption", dest="track_preemption", action="store_false")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def _main():
        svc = SchedulerService(args)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, svc.stopping.set)
        await svc.run()

    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
