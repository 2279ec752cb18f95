"""protocol/redis_conn.py against a real redis-server: a 5 s SIGSTOP is waited out without an error, a
blocking read is not cut short by the socket timeout, and retry_forever rides out a SIGKILL + restart
(logging once per outage) and stops on its stop event."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis

from protocol.redis_conn import async_client, client_options, retry_forever, retry_forever_sync, sync_client

STALL_S = 5.0


@pytest.fixture
def srv(durable_redis):  # conftest.py
    return durable_redis


class Seen(logging.Handler):
    """Collects a logger's messages and signals each one (so a test waits for an event, not a time)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []
        self.event = threading.Event()

    def emit(self, record):
        self.messages.append(record.getMessage())
        self.event.set()


@pytest.fixture
def log():
    logger = logging.getLogger(f"test_redis_conn.{time.monotonic_ns()}")
    logger.propagate = False
    seen = Seen()
    logger.addHandler(seen)
    logger.seen = seen
    return logger


def test_socket_timeout_covers_the_block_time_and_a_stall():
    opts = client_options(max_block_ms=2000)
    assert opts["socket_timeout"] >= 2.0 + STALL_S and opts["health_check_interval"] > 0


def test_async_client_waits_out_a_sigstop(srv):
    async def main():
        r = async_client(srv.url, decode_responses=True)
        await r.set("k", "before")
        srv.pause()
        asyncio.get_running_loop().call_later(STALL_S, srv.resume)
        t0 = time.monotonic()
        await r.xadd("pf:s", {"m": "during"})  # sent into the stall, answered after it: exactly once
        assert await r.get("k") == "before"
        elapsed = time.monotonic() - t0
        assert await r.xlen("pf:s") == 1
        await r.aclose()
        return elapsed

    assert asyncio.run(main()) >= STALL_S - 0.5


def test_sync_client_waits_out_a_sigstop(srv):
    r = sync_client(srv.url, decode_responses=True)
    r.set("k", "v")
    srv.pause()
    timer = threading.Timer(STALL_S, srv.resume)
    timer.start()
    try:
        assert r.get("k") == "v"
    finally:
        timer.join()
    r.close()


def test_blocking_read_is_not_cut_short(srv):
    async def main():
        r = async_client(srv.url, decode_responses=True, max_block_ms=2500, stall_tolerance_s=0.5)
        await r.xgroup_create("pf:s", "g", id="0", mkstream=True)
        t0 = time.monotonic()
        resp = await r.xreadgroup("g", "c", {"pf:s": ">"}, count=1, block=2500)
        elapsed = time.monotonic() - t0
        await r.aclose()
        return resp, elapsed

    resp, elapsed = asyncio.run(main())
    assert not resp and elapsed >= 2.4


def test_retry_forever_rides_out_a_sigkill_and_restart(srv, log):
    r0 = srv.client()
    first = r0.xadd("pf:s", {"m": "0"})
    r0.xgroup_create("pf:s", "g", id="0")
    r0.xreadgroup("g", "c", {"pf:s": ">"})  # one pending entry, delivered before the crash
    r0.close()

    async def main():
        r = async_client(srv.url, decode_responses=True)
        await r.ping()
        srv.kill()
        task = asyncio.create_task(retry_forever(lambda: r.xadd("pf:s", {"m": "1"}), what="publish", log=log))
        await asyncio.to_thread(log.seen.event.wait, 30)  # the outage was noticed and logged
        assert not task.done()
        srv.start()
        new_id = await asyncio.wait_for(task, 30)
        pending = await r.xpending("pf:s", "g")
        await r.aclose()
        return new_id, pending

    new_id, pending = asyncio.run(main())
    assert new_id > first and pending["pending"] == 1 and pending["min"] == first
    assert len(log.seen.messages) == 2, log.seen.messages  # once at the start, once at the end
    assert "unavailable (publish)" in log.seen.messages[0] and "back (publish)" in log.seen.messages[1]


def test_retry_forever_returns_none_on_stop(srv, log):
    async def main():
        r = async_client(srv.url)
        srv.kill()
        stop = asyncio.Event()
        task = asyncio.create_task(retry_forever(r.ping, what="ping", log=log, stop_event=stop))
        await asyncio.to_thread(log.seen.event.wait, 30)
        stop.set()
        result = await asyncio.wait_for(task, 10)
        await r.aclose()
        return result

    assert asyncio.run(main()) is None


def test_retry_forever_lets_other_errors_through(srv, log):
    async def main():
        r = async_client(srv.url)
        try:
            with pytest.raises(redis.ResponseError, match="NOGROUP"):
                await retry_forever(lambda: r.xreadgroup("nogroup", "c", {"pf:none": ">"}), what="read", log=log)
        finally:
            await r.aclose()

    asyncio.run(main())
    assert log.seen.messages == []


def test_retry_forever_sync_rides_out_a_restart(srv, log):
    r = sync_client(srv.url, decode_responses=True)
    r.set("k", "v")
    srv.kill()
    out: list = []
    worker = threading.Thread(target=lambda: out.append(retry_forever_sync(lambda: r.get("k"), what="get", log=log)))
    worker.start()
    assert log.seen.event.wait(30)
    srv.start()
    worker.join(30)
    assert out == ["v"] and len(log.seen.messages) == 2
    stop = threading.Event()
    srv.kill()
    stop.set()
    assert retry_forever_sync(lambda: r.get("k"), what="get", log=log, stop_event=stop) is None
    r.close()
