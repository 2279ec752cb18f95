"""gateway/batch/store.py against a real redis-server: a batch's status and the fields that go with it (the
errors of a failed batch, the file ids of a finished one) change in one step, so no reader ever sees a
terminal batch without them; a move a batch's status forbids sets none of its fields."""

from __future__ import annotations

import asyncio
import json

import redis
import redis.asyncio as aioredis

from gateway.batch import store


class ReaderAfterEachCommand:
    """Wraps an async client; after each command it runs, a second client reads the batch as the API shows it:
    what a reader polling between the writer's commands would see."""

    def __init__(self, r, url: str, batch_id: str):
        self.r, self.reader, self.batch_id = r, redis.Redis.from_url(url, decode_responses=True), batch_id
        self.views: list[dict] = []

    def __getattr__(self, name):
        attr = getattr(self.r, name)
        if name not in ("eval", "hset", "hsetnx", "execute_command"):
            return attr

        async def call(*args, **kwargs):
            out = await attr(*args, **kwargs)
            self.views.append(store.batch_view(self.batch_id, self.reader.hgetall(store.batch_key(self.batch_id))))
            return out
        return call


def test_terminal_status_and_its_fields_change_in_one_step(durable_redis):
    async def scenario():
        r = aioredis.Redis.from_url(durable_redis.url, decode_responses=True)
        failed, _ = await store.create_batch(r, "alice", "/v1/chat/completions", "file-x", "24h", None)
        done, _ = await store.create_batch(r, "alice", "/v1/chat/completions", "file-y", "24h", None)
        errors = [{"code": "invalid_file", "message": "line 1 is not JSON", "line": 1, "param": None}]

        watch = ReaderAfterEachCommand(r, durable_redis.url, failed)
        assert await store.set_status(watch, failed, "failed", errors=json.dumps(errors))
        assert watch.views and all(v["status"] != "failed" or v["errors"] == {"object": "list", "data": errors}
                                   for v in watch.views), watch.views

        watch = ReaderAfterEachCommand(r, durable_redis.url, done)
        assert await store.set_status(watch, done, "completed", output_file_id="file-o", error_file_id=None)
        assert watch.views and all(v["status"] != "completed" or v["output_file_id"] == "file-o"
                                   for v in watch.views), watch.views
        view = store.batch_view(done, await store.get_batch(r, done))
        assert view["error_file_id"] is None and view["completed_at"] is not None

        # a terminal batch does not move again, and the fields of the refused move are not written
        assert not await store.set_status(r, done, "failed", errors=json.dumps(errors))
        view = store.batch_view(done, await store.get_batch(r, done))
        assert view["status"] == "completed" and view["errors"] is None
        await r.aclose()

    asyncio.run(scenario())
