"""Ordered publishing: a step's output deltas (and its StepResult's ack) are written to Redis in the
background while the worker runs the next step, in step order per worker, and a request is forgotten only
once its final delta is written."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from protocol import FinishReason, RequestOutputDelta, SequenceOutputDelta
from protocol import streams as S
from protocol.job_store import set_job_status
from protocol.jobs import JobStatus
from scheduler.server.output_streams import queue_output_delta
from scheduler.server.state import ReqState, ServiceState, WorkerHandle

log = logging.getLogger("pagedfleet.scheduler")


def _log_failed_write(worker_id: str, fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("writing the outputs of a step of worker %s failed: %r", worker_id, fut.exception())


class Publisher:
    def __init__(self, state: ServiceState):
        self.state = state

    def queue(self, p, delta: RequestOutputDelta, st: ReqState | None) -> None:
        """Queue one delta's writes on the pipeline ``p`` (a job's final delta sets its status)."""
        s = self.state.settings
        queue_output_delta(p, delta, st.job_id if st is not None else None, s.output_ttl_s, s.job_ttl_s)

    async def apply_deltas(self, h: WorkerHandle, deltas: list[RequestOutputDelta], entry_id: str | None) -> None:
        """Take a step's tokens into the request states now (the next plan and any recovery see them) and
        write the deltas (with the StepResult's ack) in the background: encoding and writing a delta per
        running request costs milliseconds per step, which the worker would otherwise sit idle through.

        The writes of a worker's steps form a chain (each waits for the one before), registered before this
        coroutine awaits anything, so cancelling the worker's loop never drops one. Finished requests are
        forgotten only once their final delta is written: if a write fails they are still tracked, and the
        worker's loop fails on its next step (as a failed write used to fail it at once)."""
        states: list[ReqState | None] = []
        for d in deltas:
            st = self.state.requests.get(d.request_id)
            if st is not None:
                for o in d.outputs:
                    st.record_tokens(o.index, o.token_ids, o.finish_reason is not None)
            states.append(st)
        prev = h.publishing
        if deltas or entry_id is not None:
            fut = asyncio.ensure_future(self._write_step(h, prev, deltas, states, entry_id))
            fut.add_done_callback(functools.partial(_log_failed_write, h.wid))
            h.publishing = fut
            for st in states:
                if st is not None:
                    st.publishing = fut
        if prev is not None:  # at most one step's writes behind: normally done while this step ran
            await asyncio.shield(prev)

    async def _write_step(self, h: WorkerHandle, prev: asyncio.Future | None, deltas: list[RequestOutputDelta],
                          states: list[ReqState | None], entry_id: str | None) -> None:
        if prev is not None:
            await prev  # in order; if it failed, so does this (the worker's loop is failing already)
        async with self.state.r.pipeline(transaction=True) as p:
            for d, st in zip(deltas, states):
                self.queue(p, d, st)
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
                self.state.forget(st)
                h.requests.discard(st.request_id)
        if h.publishing is me:
            h.publishing = None

    @staticmethod
    async def flush(h: WorkerHandle | None) -> None:
        """Wait for the worker's pending step writes (raises what they raised)."""
        pending = h.publishing if h is not None else None
        if pending is not None:
            await asyncio.shield(pending)  # a cancelled waiter (a worker loop being stopped) leaves it running

    async def finish_locally(self, st: ReqState, reason: FinishReason, error: str | None) -> None:
        """Publish a final delta for a request no Scheduler will report on, and forget it (after any of its
        deltas still being written, so the final one comes last)."""
        if st.publishing is not None:
            with contextlib.suppress(Exception):  # a failed write was logged; the final delta still goes out
                await asyncio.shield(st.publishing)
            if self.state.requests.get(st.request_id) is not st:
                return  # that write was its final delta (it finished on the worker meanwhile)
        n = st.request.sampling.n
        outs = [SequenceOutputDelta(index=i, finish_reason=reason) for i in range(n) if i not in st.finished_idx]
        delta = RequestOutputDelta(request_id=st.request_id, outputs=outs, finished=True, error=error,
                                   num_prompt_tokens=len(st.request.prompt_token_ids))
        async with self.state.r.pipeline(transaction=True) as p:
            self.queue(p, delta, st)
            await p.execute()
        self.state.forget(st)

    async def dead_letter(self, stream: str, entry_id: str, fields: dict, reason: str,
                          request_id: str | None = None, deliveries: int = 1, job_id: str | None = None) -> None:
        """Move a stream entry to ``pf:dead`` (acknowledged); its request, if named, fails with ``reason``."""
        dl = S.DeadLetter(stream=stream, group=S.SCHEDULER_GROUP, entry_id=entry_id, deliveries=deliveries,
                          payload=S.raw_payload(fields), reason=reason)
        log.error("dead-lettering %s %s: %s", stream, entry_id, reason)
        async with self.state.r.pipeline(transaction=True) as p:
            p.xadd(S.DEAD_LETTER, S.encode(dl), maxlen=S.DEAD_MAXLEN, approximate=True)
            p.xack(stream, S.SCHEDULER_GROUP, entry_id)
            if request_id:
                self.queue(p, RequestOutputDelta(request_id=request_id, finished=True, error=reason), None)
                if job_id:
                    set_job_status(p, job_id, JobStatus.FAILED, reason)
            await p.execute()
        if self.state.metrics is not None:
            self.state.metrics.inc_dead_lettered(stream)
