"""Intake: the requests stream (consumer group ``scheduler``). An accepted request is in ``pf:active`` in
the same transaction as its XACK; an entry delivered too often is dead-lettered; aborts go to the
request's worker."""

from __future__ import annotations

import asyncio
import contextlib
import random


from protocol import FinishReason
from protocol import streams as S
from protocol.redis_conn import read_group
from scheduler.server.placement import Placement
from scheduler.server.publishing import Publisher
from scheduler.server.state import ReqState, ServiceState


class Intake:
    def __init__(self, state: ServiceState, placement: Placement, publisher: Publisher):
        self.state = state
        self.placement = placement
        self.publisher = publisher

    async def requests_loop(self) -> None:
        s = self.state
        backlog = True  # entries delivered to us before a restart and not acknowledged come first
        while not s.stopping.is_set():
            if not s.workers:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(s.have_worker.wait(), timeout=1.0)
                continue
            entries = await read_group(s.r, S.REQUESTS, S.SCHEDULER_GROUP, "scheduler", last_id="0" if backlog else ">",
                                       count=256, block=None if backlog else 1000, create_id="0")
            if backlog and not entries:
                backlog = False
                continue
            for entry_id, fields in entries:
                deliveries = 1
                if backlog:  # delivered before (to us, before a restart): maybe it is what killed us
                    info = await s.r.xpending_range(S.REQUESTS, S.SCHEDULER_GROUP, min=entry_id, max=entry_id,
                                                    count=1)
                    deliveries = int(info[0]["times_delivered"]) if info else 1
                await self.handle_entry(entry_id, fields, deliveries)

    async def handle_entry(self, entry_id: str, fields: dict, deliveries: int = 1) -> None:
        s, r = self.state, self.state.r
        try:
            cmd = S.decode(fields, S.RequestCommand)
        except Exception as e:
            await self.publisher.dead_letter(S.REQUESTS, entry_id, fields, f"malformed request entry: {e}")
            return
        total = cmd.deliveries + deliveries
        if total > s.settings.max_deliveries and cmd.op == "add" and cmd.request_id not in s.requests:
            await self.publisher.dead_letter(
                S.REQUESTS, entry_id, fields, f"request {cmd.request_id} was delivered {total} times without being "
                f"processed; moved to the dead-letter stream", cmd.request_id, total, cmd.job_id)
            return
        if cmd.op == "abort":
            await self.abort(cmd.request_id, cmd.reason or "aborted")
            await r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
            return
        if cmd.request is None:
            await self.publisher.dead_letter(S.REQUESTS, entry_id, fields, "add without a request", cmd.request_id)
            return
        rid = cmd.request_id
        if rid in s.requests or await r.hexists(S.ACTIVE, rid):
            await r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)  # a redelivery: already accepted
            return
        if await r.exists(S.output_stream(rid)):
            # finished before (its output stream exists): a duplicate from a reclaimed entry
            await r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
            return
        req = cmd.request
        if req.sampling.seed is None:
            # fix the seed now so a resumed request samples exactly what it would have
            req = req.model_copy(update={"sampling": req.sampling.model_copy(update={"seed": random.getrandbits(62)})})
        st = ReqState(request=req, job_id=cmd.job_id, gateway=cmd.gateway)
        s.requests[rid] = st
        ok = await self.placement.place(st)
        if ok and rid in s.requests:
            async with r.pipeline(transaction=True) as p:
                p.hset(S.ACTIVE, rid, st.active_record().model_dump_json())
                p.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)
                await p.execute()
        else:
            await r.xack(S.REQUESTS, S.SCHEDULER_GROUP, entry_id)

    async def abort(self, rid: str, reason: str) -> None:
        s = self.state
        st = s.requests.get(rid)
        if st is None:
            return
        st.aborted = True
        h = s.workers.get(st.worker_id) if st.worker_id else None
        if h is not None and not h.dead and h.sched.abort_request(rid):
            # freed in the next plan; the final delta (finish_reason abort) comes out of the next update()
            h.wake.set()
            return
        if st in s.orphans:
            s.orphans.remove(st)
        await self.publisher.finish_locally(st, FinishReason.ABORT, None)
