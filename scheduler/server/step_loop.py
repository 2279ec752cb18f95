"""The per-worker step loop: schedule -> StepPlan on ``pf:plan:{worker}`` -> its StepResult on
``pf:results`` (matched to the plan in flight by step id) -> ``Scheduler.update`` -> the deltas to the
publisher. One asyncio task per worker.

The plans sent and not yet answered are ``WorkerHandle.in_flight`` (oldest first), bounded by
``WorkerHandle.max_in_flight``: 1 + the settings' ``pipeline_lookahead`` when ``pipeline`` is on (the next
plans are made by ``Scheduler.schedule_ahead`` while the worker runs the oldest, so the worker finds its next
plan already queued on its stream), 1 with ``--no-pipeline``. A worker's results arrive in plan order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable


from protocol import StepPlan, StepResult
from protocol import streams as S
from protocol.job_store import set_job_status
from protocol.redis_conn import read_group, retry_forever
from protocol.jobs import JobStatus
from scheduler.sequence import SequenceStatus
from scheduler.server.publishing import Publisher
from scheduler.server.state import InFlightStep, ReqState, ServiceState, WorkerDead, WorkerHandle

log = logging.getLogger("pagedfleet.scheduler")

RESULT_IDLE_MS = 3000  # a StepResult pending on us this long was lost on its way (its XREADGROUP reply died)
LEDGER_EVERY = 8  # steps between ledger gauge updates (and once when the worker goes idle)
_PREEMPTED = (SequenceStatus.SWAPPED, SequenceStatus.WAITING)


class StepLoop:
    def __init__(self, state: ServiceState, publisher: Publisher,
                 declare_dead: Callable[[WorkerHandle, str], Awaitable[None]]):
        self.state = state
        self.publisher = publisher
        self.declare_dead = declare_dead
        self._tasks: set[asyncio.Future] = set()  # job-status writes in flight

    def start(self, h: WorkerHandle) -> None:
        h.task = asyncio.create_task(self.run(h), name=f"worker-{h.wid}")

    async def run(self, h: WorkerHandle) -> None:
        try:
            while not h.dead and not self.state.stopping.is_set():
                await self._step(h)
        except (asyncio.CancelledError, WorkerDead):
            pass
        except Exception:
            log.exception("worker loop %s crashed", h.wid)
            await self.declare_dead(h, "scheduler loop error")

    async def _idle(self, h: WorkerHandle, timeout: float) -> None:
        h.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(h.wake.wait(), timeout=timeout)

    async def _step(self, h: WorkerHandle) -> None:
        """Send plans until ``h.max_in_flight`` are in flight (the first planned synchronously, the next ahead
        of their predecessors' results when pipelined), then apply the oldest result."""
        sched = h.sched
        if not h.in_flight:
            if not sched.has_unfinished_requests():
                await self._idle(h, 1.0)
                return
            t0 = time.perf_counter()
            plan = sched.schedule()
            t_sched = time.perf_counter() - t0
            if plan.is_empty and not plan.new_sequences and not plan.forks:
                # nothing for the worker: collect what the Scheduler has to say (aborts) without a round trip
                deltas = sched.update(StepResult(worker_id=h.wid, step_id=plan.step_id))
                if deltas:
                    await self.publisher.apply_deltas(h, deltas, None)
                else:
                    await self._idle(h, 0.05)
                return
            await self._send(h, plan, t_sched)
        while len(h.in_flight) < h.max_in_flight and sched.num_in_flight:
            t0 = time.perf_counter()
            plan = sched.schedule_ahead()
            if plan is None:
                break  # the next step needs the results first
            await self._send(h, plan, time.perf_counter() - t0)
        await self._receive(h)

    async def _send(self, h: WorkerHandle, plan: StepPlan, t_sched: float) -> None:
        step = InFlightStep(plan=plan, wire_step=h.next_wire_step(), internal_step=plan.step_id,
                            result=asyncio.get_running_loop().create_future(), schedule_s=t_sched, sent_at=0.0)
        plan.worker_id = h.wid
        plan.step_id = step.wire_step
        h.in_flight.append(step)
        self._note_plan(h, step)
        step.sent_at = time.perf_counter()
        fields = S.encode(plan)
        # an outage is waited out (the step stays in flight); a copy of a plan sent twice (its reply was lost)
        # is not run twice: the worker skips step ids it has run
        await retry_forever(lambda: self.state.r.xadd(S.plan_stream(h.wid), fields, maxlen=S.PLAN_MAXLEN,
                                                      approximate=True),
                            what=f"send plan to {h.wid}", log=log, stop_event=self.state.stopping)

    async def _receive(self, h: WorkerHandle) -> None:
        """Wait for the oldest step's result and apply it."""
        step = h.in_flight[0]
        res, entry_id = await step.result
        now = time.perf_counter()
        # pipelined, a plan waits on the worker's stream while the one before it runs: its round trip starts
        # when the worker could take it (its predecessor's result)
        rtt = now - max(step.sent_at, h.last_result_at)
        h.last_result_at = now
        h.in_flight.popleft()
        res.step_id = step.internal_step
        if res.error:
            log.error("worker %s failed step %s: %s", h.wid, step.wire_step, res.error)
        t2 = time.perf_counter()
        deltas = h.sched.update(res)  # a failed step finishes its requests with the error
        await self.publisher.apply_deltas(h, deltas, entry_id)
        self._observe(h, step, res, rtt, time.perf_counter() - t2)

    def _observe(self, h: WorkerHandle, step: InFlightStep, res: StepResult, rtt: float, update_s: float) -> None:
        self.state.throughput.count(step.plan.num_batched_tokens, len(res.outputs))
        m = self.state.metrics
        if m is None:
            return
        model, plan = h.reg.info.model, step.plan
        ex = res.execute_ms / 1000.0
        m.observe_plan(h.wid, plan, model)
        m.observe_step(h.wid, step.schedule_s, max(0.0, rtt - ex), ex, batch_size=len(plan.scheduled),
                       batched_tokens=plan.num_batched_tokens, model=model, update_s=update_s)
        if h.steps % LEDGER_EVERY == 0 or not h.sched.has_unfinished_requests():
            m.update_ledger(h.wid, model, h.sched.stats())

    async def results_loop(self) -> None:
        """Hand each StepResult to the step in flight it answers; acknowledge stale ones."""
        s = self.state
        last_reclaim = time.monotonic()
        while not s.stopping.is_set():
            entries = await read_group(s.r, S.RESULTS, S.SCHEDULER_GROUP, "scheduler", count=64, block=1000)
            if time.monotonic() - last_reclaim > RESULT_IDLE_MS / 1000:
                last_reclaim = time.monotonic()
                entries = entries + await self._lost_results()
            if not entries:
                continue
            stale = []
            for entry_id, fields in entries:
                try:
                    res = S.decode(fields, StepResult)
                except Exception as e:
                    await self.publisher.dead_letter(S.RESULTS, entry_id, fields, f"malformed StepResult: {e}")
                    continue
                h = s.workers.get(res.worker_id)
                step = h.awaiting(res.step_id) if h is not None else None
                if step is None:
                    stale.append(entry_id)  # a dead worker's or an earlier scheduler's step
                    continue
                step.result.set_result((res, entry_id))
            if stale:
                await s.r.xack(S.RESULTS, S.SCHEDULER_GROUP, *stale)

    async def _lost_results(self) -> list:
        """StepResults delivered to us long ago and never acknowledged. Either their XREADGROUP
        reply was lost with a dead connection (Redis restarted mid-reply: a step would wait for it forever)
        or they belong to an earlier scheduler (stale, acknowledged by the caller). Claimed back, they are
        handled like fresh ones."""
        resp = await self.state.r.xautoclaim(S.RESULTS, S.SCHEDULER_GROUP, "scheduler", RESULT_IDLE_MS,
                                             start_id="0-0", count=64)
        entries = [(eid, fields) for eid, fields in resp[1] if fields]
        gone = [eid for eid, fields in resp[1] if not fields]  # trimmed while pending
        if gone:
            await self.state.r.xack(S.RESULTS, S.SCHEDULER_GROUP, *gone)
        return entries

    # ------------------------------------------------------------------ request and job status
    def _note_plan(self, h: WorkerHandle, step: InFlightStep) -> None:
        m = self.state.metrics
        for ns in step.plan.new_sequences:
            st = self.state.requests.get(ns.request_id)
            if st is None:
                continue
            st.started = True
            if not st.queue_observed:
                st.queue_observed = True
                if m is not None:
                    m.observe_queue_time(h.wid, _queue_time(st), h.reg.info.model)
            self._set_job_status(st, JobStatus.RUNNING)
        if self.state.settings.track_preemption:
            self._note_preemptions(h)

    def _note_preemptions(self, h: WorkerHandle) -> None:
        """Job status: running / preempted (swapped out, or waiting again after a recompute preemption)."""
        for rid in h.requests:
            st = self.state.requests.get(rid)
            if st is None or not st.job_id or not st.started:
                continue
            status = h.sched.request_status(rid)
            if status in _PREEMPTED:
                self._set_job_status(st, JobStatus.PREEMPTED)
            elif status is SequenceStatus.RUNNING:
                self._set_job_status(st, JobStatus.RUNNING)

    def _set_job_status(self, st: ReqState, status: JobStatus) -> None:
        """Write a job's new status in the background (the step does not wait for it)."""
        if not st.job_id or st.status == status:
            return
        st.status = status
        t = asyncio.ensure_future(set_job_status(self.state.r, st.job_id, status))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


def _queue_time(st: ReqState) -> float:
    """Seconds from the request's arrival (the gateway's ``arrival_time``, wall clock) to now, its first
    StepPlan. Without a usable arrival time (none, or ahead of this clock), from when this scheduler read it."""
    now = time.time()
    arrival = st.request.arrival_time
    start = arrival if 0 < arrival <= now else st.received_at
    return max(0.0, now - start)
