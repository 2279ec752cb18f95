"""Following submitted requests: their deltas through the output processors, merged for several
prompts, aborted when every completion hit a stop string or when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from gateway.fleet import FleetClient, FleetError
from gateway.prepare import Prepared
from model_io.output_processor import CompletionUpdate, RequestOutputProcessor


async def follow(fleet: FleetClient, proc: RequestOutputProcessor, mtrack=None) -> AsyncIterator[list[CompletionUpdate]]:
    """Apply the request's deltas to `proc`, yielding the updates of each; aborts the request once
    every completion hit a stop string. Returns when there is nothing more to show."""
    async for delta in fleet.deltas(proc.request_id):
        if mtrack is not None:
            mtrack.on_delta(delta)
        updates = proc.apply(delta)
        if proc.needs_abort:
            proc.abort_sent = True
            await fleet.abort(proc.request_id, "stop string")
        yield updates
        if proc.done:
            break
    if mtrack is not None:
        reasons = [c.finish_reason for c in proc.completions if c.finish_reason]
        mtrack.finish(reasons[0] if reasons else ("error" if proc.error else "abort"))


async def merged(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """The items of several async iterators as they come, each with the index of its iterator."""
    if len(gens) == 1:
        async for x in gens[0]:
            yield 0, x
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for x in g:
                await q.put((i, x, None))
        except BaseException as e:  # noqa: BLE001 - passed on to the consumer
            await q.put((i, None, e))
            return
        await q.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, x, err = await q.get()
            if err is not None:
                raise err
            if x is None:
                left -= 1
                continue
            yield i, x
    finally:
        for t in tasks:
            t.cancel()


def abort_unfinished(fleet: FleetClient, procs: list[RequestOutputProcessor], reason: str) -> None:
    for p in procs:
        if not p.finished and not p.abort_sent:
            p.abort_sent = True
            fleet.abort_soon(p.request_id, reason)


async def _collect(fleet: FleetClient, procs: list[RequestOutputProcessor], mtracks: list) -> None:
    async def one(p, m):
        async for _ in follow(fleet, p, m):
            pass

    await asyncio.gather(*(one(p, m) for p, m in zip(procs, mtracks)))


async def collect_unless_disconnected(request: Request, fleet: FleetClient, procs: list[RequestOutputProcessor],
                                      mtracks: list) -> bool:
    """Collect every output; returns False if the client went away first (its requests are aborted)."""
    work = asyncio.create_task(_collect(fleet, procs, mtracks))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.5)
            if done:
                work.result()
                return True
            if await request.is_disconnected():
                work.cancel()
                abort_unfinished(fleet, procs, "client disconnected")
                return False
    except BaseException:
        work.cancel()
        abort_unfinished(fleet, procs, "gateway error")
        raise


def raise_on_error(procs: list[RequestOutputProcessor]) -> None:
    for p in procs:
        if p.error:
            raise FleetError(f"request {p.request_id} failed: {p.error}", 500)


def start_metrics(metrics, prep: Prepared) -> list:
    if metrics is None:
        return [None] * len(prep.prompts)
    return [metrics.start_request(prep.model, len(ids)) for ids in prep.prompts]


def finish_metrics(mtracks: list, reason: str) -> None:
    for m in mtracks:
        if m is not None:
            m.finish(reason)
