"""Cursor pages over a per-owner index (a sorted set of ids scored by creation time), newest first:
OpenAI's list shape `{"object": "list", "data", "first_id", "last_id", "has_more"}` with `limit` and
`after` (the last id of the previous page). Ids whose record expired are dropped from the index on the way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.errors import BadRequest

MAX_LIMIT = 100


def owner_index(kind: str, owner: str) -> str:
    return f"pf:index:{kind}:{owner or 'anonymous'}"


async def page(redis, index: str, limit: int, after: str | None,
               load: Callable[[list[str]], Awaitable[list[dict | None]]],
               keep: Callable[[dict], bool] = lambda _: True) -> dict:
    """`load(ids)` returns each id's view (None: gone); `keep` filters the views (e.g. by status)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit: must be between 1 and {MAX_LIMIT}", "limit")
    start = 0
    if after is not None:
        rank = await redis.zrevrank(index, after)
        if rank is None:
            raise BadRequest(f"after: {after!r} is not an id of yours", "after", 404)
        start = rank + 1
    found: list[dict] = []
    chunk = max(2 * limit, 32)
    while len(found) <= limit:
        ids = await redis.zrevrange(index, start, start + chunk - 1)
        if not ids:
            break
        start += len(ids)
        views = await load(ids)
        gone = [i for i, v in zip(ids, views) if v is None]
        if gone:
            await redis.zrem(index, *gone)
            start -= len(gone)
        found.extend(v for v in views if v is not None and keep(v))
    data = found[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}


async def add_to_index(redis, index: str, item_id: str, created_at: float, ttl_s: int) -> None:
    async with redis.pipeline(transaction=False) as p:
        p.zadd(index, {item_id: created_at})
        p.expire(index, ttl_s)
        await p.execute()
