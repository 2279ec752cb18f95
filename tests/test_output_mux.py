"""gateway/output_mux.py against a real redis-server: one reader delivers every followed stream's entries, in
order, to its follower; a follower that joins while the read is blocked on other streams is woken at once
(not at the read's timeout); a second follower of the same stream is told to read it itself; a Redis
SIGKILL + restart reaches the followers as OUTAGE and the reading goes on after it."""

from __future__ import annotations

import asyncio

import pytest

from gateway import output_mux
from gateway.output_mux import OUTAGE, OutputMux
from protocol.redis_conn import async_client


@pytest.fixture
def srv(durable_redis):  # conftest.py
    return durable_redis


def _client(srv):
    import redis.asyncio as aioredis

    return async_client(srv.url, decode_responses=True, max_block_ms=60_000,
                        connection_pool_class=aioredis.BlockingConnectionPool, max_connections=64, timeout=30)


async def _take(queue: asyncio.Queue, n: int) -> list:
    return [await asyncio.wait_for(queue.get(), 30) for _ in range(n)]


def test_every_followed_stream_in_order(srv):
    async def main():
        r = _client(srv)
        mux = OutputMux(r)
        queues = {f"s{i}": mux.follow(f"s{i}") for i in range(64)}
        for step in range(20):
            async with r.pipeline(transaction=False) as p:
                for key in queues:
                    p.xadd(key, {"step": str(step)})
                await p.execute()
        got = await asyncio.gather(*(_take(q, 20) for q in queues.values()))
        await mux.aclose()
        await r.aclose()
        return got

    for entries in asyncio.run(main()):
        assert [fields["step"] for _id, fields in entries] == [str(i) for i in range(20)]


def test_a_new_follower_wakes_the_blocked_read(srv, monkeypatch):
    monkeypatch.setattr(output_mux, "BLOCK_MS", 60_000)  # without the wake the new stream waits a minute

    async def main():
        r = _client(srv)
        mux = OutputMux(r)
        mux.follow("idle")  # the reader blocks on this stream alone
        admin = srv.client()
        while not any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in admin.client_list()):
            await asyncio.sleep(0.01)  # until Redis shows the read blocked
        q = mux.follow("new")
        assert mux.follow("new") is None  # already followed here: the second reader reads it itself
        await r.xadd("new", {"t": "1"})
        (entry,) = await _take(q, 1)
        await mux.aclose()
        await r.aclose()
        return entry

    assert asyncio.run(asyncio.wait_for(main(), 20))[1] == {"t": "1"}


def test_an_outage_reaches_the_followers_and_reading_goes_on(srv):
    async def main():
        r = _client(srv)
        mux = OutputMux(r)
        q = mux.follow("s")
        await r.xadd("s", {"t": "0"})
        assert (await _take(q, 1))[0][1] == {"t": "0"}
        srv.kill()
        assert await asyncio.wait_for(q.get(), 30) is OUTAGE
        srv.start()  # appendfsync everysec: the entry written before the kill may or may not be back
        await r.xadd("s", {"t": "1"})
        while True:
            item = await asyncio.wait_for(q.get(), 30)
            if item is not OUTAGE:
                break
        await mux.aclose()
        await r.aclose()
        return item

    assert asyncio.run(main())[1] == {"t": "1"}
