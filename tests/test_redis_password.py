"""Redis with a password: every client the services build (protocol.redis_conn, sync and async with the
gateway's pool, Celery housekeeping's broker) takes it from REDIS_URL; without it Redis refuses; serve prints
the URL masked."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import redis
import redis.asyncio as aioredis

from pagedfleet.serve import _redacted, redis_server_binary
from protocol.redis_conn import async_client, sync_client
from redis_process import free_port

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", PASSWORD,
                             "--dir", str(tmp_path_factory.mktemp("redis-pw"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    yield port, url
    proc.terminate()
    proc.wait(10)


def test_clients_pass_the_password_from_the_url(locked_redis):
    port, url = locked_redis
    with pytest.raises(redis.AuthenticationError):  # a bare client: redis_conn's would retry it as an outage
        redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", retry=None).set("k", "v")
    assert sync_client(url).set("k", "v")

    async def gateway_client():  # the gateway's client: a BlockingConnectionPool
        r = async_client(url, decode_responses=True, connection_pool_class=aioredis.BlockingConnectionPool,
                         max_connections=4, timeout=5)
        try:
            return await r.get("k")
        finally:
            await r.aclose()

    assert asyncio.run(gateway_client()) == "v"


def test_celery_broker_authenticates_with_the_url(locked_redis):
    from scheduler.server.config import SchedulerSettings
    from scheduler.server.housekeeping import make_app

    app = make_app(SchedulerSettings(redis_url=locked_redis[1]))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.connected


def test_serve_prints_the_url_masked():
    assert _redacted(f"redis://:{PASSWORD}@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
