"""Batch records in Redis, shared by the gateway (routes) and the Celery batch workers (runner).

Keys (`{id}` is `batch_` + 32 random hex digits):

* `pf:batch:{id}` hash: `meta` (JSON: endpoint, input file, window, metadata, created_at, expires_at),
  `owner`, `status`, `<status>_at` timestamps, `total` / `completed` / `failed`, `output_file_id`,
  `error_file_id`, `errors` (JSON).
* `pf:batch:{id}:results` hash: line index -> its output line (JSON), written once (HSETNX): a line
  recorded is never run again, and the counts move only when a line is first recorded.
* `pf:batch:{id}:submitted` hash: line index -> "1" once its requests were put on the requests stream
  (in the same MULTI as the XADD): a resumed runner re-attaches to them instead of submitting again.
* `pf:batch:{id}:lease`: the runner's lease (SET NX EX, renewed); `pf:batch:{id}:queued`: a run is queued.
* `pf:batches:open` set: batches not yet terminal (the sweeper resumes those whose lease lapsed).
"""

from __future__ import annotations

import json
import time
import uuid

from gateway.idempotency import Idempotency, create_once
from gateway.listing import owner_index

TERMINAL = ("completed", "failed", "expired", "cancelled")
OPEN = "pf:batches:open"
WINDOW_S = {"24h": 24 * 3600}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
RECORD_TTL_S = 30 * 24 * 3600  # a finished batch's record, results and index entry are kept 30 days

# ARGV: status, stamp, n (the count of statuses it must not move from), those n statuses, then field/value
# pairs set in the same step: a reader never sees a terminal status without its errors or output file ids.
SET_STATUS_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do if cur == ARGV[i] then return 0 end end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
for i = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

RECORD_LINE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def batch_key(batch_id: str) -> str:
    return f"pf:batch:{batch_id}"


def results_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}:results"


def submitted_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}:submitted"


def lease_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}:lease"


def queued_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}:queued"


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files: fixed per batch, so a re-run of finalizing overwrites."""
    hexpart = batch_id.removeprefix("batch_")
    return f"file-{hexpart}out", f"file-{hexpart}err"


async def create_batch(r, owner: str, endpoint: str, input_file_id: str, window: str, metadata,
                       idem: Idempotency | None = None) -> tuple[str, bool]:
    """(the new batch's id, False); with `idem`, a batch already made with that key: (its id, True)."""
    batch_id = new_batch_id()
    now = time.time()
    meta = {"endpoint": endpoint, "input_file_id": input_file_id, "completion_window": window,
            "metadata": metadata, "created_at": int(now), "expires_at": int(now + WINDOW_S[window])}

    def queue(p) -> None:
        p.hset(batch_key(batch_id), mapping={"meta": json.dumps(meta), "owner": owner, "status": "validating",
                                             "total": 0, "completed": 0, "failed": 0})
        p.sadd(OPEN, batch_id)
        p.zadd(owner_index("batches", owner), {batch_id: now})
        p.zremrangebyscore(owner_index("batches", owner), "-inf", now - RECORD_TTL_S)  # their records expired
        p.expire(owner_index("batches", owner), RECORD_TTL_S)

    return await create_once(r, idem, batch_id, queue, RECORD_TTL_S + WINDOW_S[window])


async def set_status(r, batch_id: str, status: str, unless: tuple[str, ...] = TERMINAL, **fields) -> bool:
    """Move to `status` (stamping `<status>_at`) and set `fields`, in one step, unless the batch is in one
    of `unless`."""
    pairs = [x for k, v in fields.items() if v is not None for x in (k, v)]
    ok = bool(await r.eval(SET_STATUS_LUA, 1, batch_key(batch_id), status, int(time.time()), len(unless),
                           *unless, *pairs))
    if ok and status in TERMINAL:
        async with r.pipeline(transaction=False) as p:
            p.srem(OPEN, batch_id)
            for key in (batch_key(batch_id), results_key(batch_id)):
                p.expire(key, RECORD_TTL_S)
            p.delete(submitted_key(batch_id))
            await p.execute()
    return ok


async def record_line(r, batch_id: str, index: int, line: dict, ok: bool) -> bool:
    """Record line `index`'s output line once; False if it was already recorded."""
    return bool(await r.eval(RECORD_LINE_LUA, 2, results_key(batch_id), batch_key(batch_id), str(index),
                             json.dumps(line), "completed" if ok else "failed"))


def batch_view(batch_id: str, raw: dict) -> dict:
    """The record as OpenAI's Batch object."""
    meta = json.loads(raw["meta"])
    view = {"id": batch_id, "object": "batch", "endpoint": meta["endpoint"], "errors": None,
            "input_file_id": meta["input_file_id"], "completion_window": meta["completion_window"],
            "status": raw["status"], "output_file_id": raw.get("output_file_id"),
            "error_file_id": raw.get("error_file_id"), "created_at": meta["created_at"],
            "expires_at": meta["expires_at"], "metadata": meta.get("metadata"),
            "request_counts": {"total": int(raw.get("total", 0)), "completed": int(raw.get("completed", 0)),
                               "failed": int(raw.get("failed", 0))}}
    for status in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
        stamp = raw.get(f"{status}_at")
        view[f"{status}_at"] = int(stamp) if stamp else None
    if raw.get("errors"):
        view["errors"] = {"object": "list", "data": json.loads(raw["errors"])}
    return view


async def get_batch(r, batch_id: str, owner: str | None = None) -> dict | None:
    """The raw record; None if missing or (with `owner`) not that owner's."""
    raw = await r.hgetall(batch_key(batch_id))
    if not raw or "meta" not in raw or (owner is not None and raw.get("owner") != owner):
        return None
    return raw
