"""Housekeeping with Celery (+ celery beat): broker and result backend are the fleet's Redis; JSON only.

    celery -A scheduler.housekeeping worker -B --pool solo --concurrency 1 -Q pagedfleet-housekeeping

Periodic tasks (celery beat, in-memory schedule: no shelve file, no pickle):

* ``expire_jobs``: delete finished jobs (and their output streams) older than their TTL.
* ``trim_streams``: trim the requests / results / plan / dead-letter streams to about their bound,
  never past an entry a consumer group has not read or acknowledged (XTRIM MINID).
* ``reclaim_pending``: entries a consumer left pending for longer than ``PAGEDFLEET_RECLAIM_IDLE_S``
  (its consumer died) are claimed with XAUTOCLAIM. A request entry is put back on the stream (its
  ``deliveries`` count carried along) unless it was delivered ``PAGEDFLEET_MAX_DELIVERIES`` times: then
  it goes to the dead-letter stream ``pf:dead`` and its request fails with a clear error (a final
  RequestOutputDelta with ``error`` on its output stream; its job, if any, becomes ``failed``). Result
  and plan entries of a dead consumer are stale (their requests are resumed by recompute): they are
  acknowledged and counted.

The functions are plain functions of a sync Redis client too (``*_once(r, ...)``), for tests and tools.
"""

from __future__ import annotations

import logging
import os
import time

import redis
from celery import Celery

from protocol import FinishReason, RequestOutputDelta, SequenceOutputDelta
from protocol import streams as S

log = logging.getLogger("pagedfleet.housekeeping")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "pagedfleet-housekeeping"
STATS = S.PREFIX + "housekeeping:stats"
RECLAIMER = "housekeeper"


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


RECLAIM_IDLE_S = _float_env("PAGEDFLEET_RECLAIM_IDLE_S", 60.0)
MAX_DELIVERIES = int(_float_env("PAGEDFLEET_MAX_DELIVERIES", 5))
DEFAULT_JOB_TTL_S = _float_env("PAGEDFLEET_JOB_TTL", 86400.0)
OUTPUT_TTL_S = _float_env("PAGEDFLEET_OUTPUT_TTL_S", 600.0)
PERIOD_S = _float_env("PAGEDFLEET_HOUSEKEEPING_PERIOD_S", 15.0)

app = Celery("pagedfleet", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_default_queue=QUEUE,
    task_ignore_result=True,
    result_expires=3600,
    timezone="UTC",
    enable_utc=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    beat_scheduler="celery.beat:Scheduler",  # in memory: the default PersistentScheduler pickles to a shelve
    beat_schedule={
        "expire-jobs": {"task": "pagedfleet.expire_jobs", "schedule": PERIOD_S * 2},
        "trim-streams": {"task": "pagedfleet.trim_streams", "schedule": PERIOD_S * 2},
        "reclaim-pending": {"task": "pagedfleet.reclaim_pending", "schedule": PERIOD_S},
    },
)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url or REDIS_URL, decode_responses=True)


# ------------------------------------------------------------------------------------------------
# expire jobs


def expire_jobs_once(r: redis.Redis, now: float | None = None, default_ttl_s: float = DEFAULT_JOB_TTL_S) -> list[str]:
    """Delete finished jobs whose TTL passed. Returns the deleted job ids."""
    now = time.time() if now is None else now
    expired = []
    for job_id, finished_at in r.zrange(S.JOBS_FINISHED, 0, -1, withscores=True):
        key = S.job_key(job_id)
        meta = r.hget(key, "meta")
        ttl = default_ttl_s
        request_id = job_id
        if meta:
            try:
                m = S.JobMeta.model_validate_json(meta)
                ttl, request_id = m.ttl_s, m.request_id
            except Exception:
                pass
        if finished_at + ttl > now:
            continue
        p = r.pipeline(transaction=True)
        p.delete(key)
        p.delete(S.output_stream(request_id))
        p.zrem(S.JOBS_FINISHED, job_id)
        p.execute()
        expired.append(job_id)
    if expired:
        r.hincrby(STATS, "jobs_expired", len(expired))
    return expired


# ------------------------------------------------------------------------------------------------
# trim streams


def _plan_streams(r: redis.Redis) -> list[str]:
    return [k for k in r.scan_iter(match=S.plan_stream("*"), count=200)]


def trim_streams_once(r: redis.Redis) -> dict[str, str | None]:
    out = {}
    for stream, maxlen in ((S.REQUESTS, S.REQUESTS_MAXLEN), (S.RESULTS, S.RESULTS_MAXLEN)):
        out[stream] = S.safe_trim_minid(r, stream, maxlen)
    for stream in _plan_streams(r):
        out[stream] = S.safe_trim_minid(r, stream, S.PLAN_MAXLEN)
    r.xtrim(S.DEAD_LETTER, maxlen=S.DEAD_MAXLEN, approximate=True) if r.exists(S.DEAD_LETTER) else None
    return out


# ------------------------------------------------------------------------------------------------
# reclaim pending entries of dead consumers


def fail_request(r, request_id: str, error: str, job_id: str | None = None, n: int = 1) -> None:
    """Finish a request with an error the gateway shows (and its job, if any, as failed)."""
    delta = RequestOutputDelta(request_id=request_id, finished=True, error=error,
                               outputs=[SequenceOutputDelta(index=i, finish_reason=FinishReason.ERROR)
                                        for i in range(n)])
    p = r.pipeline(transaction=True)
    key = S.output_stream(request_id)
    p.xadd(key, S.encode(delta))
    p.expire(key, int(DEFAULT_JOB_TTL_S if job_id else OUTPUT_TTL_S))
    p.hdel(S.ACTIVE, request_id)
    if job_id:
        S.set_job_status(p, job_id, S.JobStatus.FAILED, error)
    p.execute()


def dead_letter(r, stream: str, group: str, entry_id: str, fields: dict, deliveries: int, reason: str) -> None:
    dl = S.DeadLetter(stream=stream, group=group, entry_id=entry_id, deliveries=deliveries,
                      payload=S.raw_payload(fields), reason=reason)
    p = r.pipeline(transaction=True)
    p.xadd(S.DEAD_LETTER, S.encode(dl), maxlen=S.DEAD_MAXLEN, approximate=True)
    p.xack(stream, group, entry_id)
    p.hincrby(STATS, f"dead:{stream}", 1)
    p.execute()
    log.error("dead-lettered %s %s after %d deliveries: %s", stream, entry_id, deliveries, reason)


def _deliveries(r, stream: str, group: str, entry_id: str) -> int:
    """Times the entry reached a consumer (XAUTOCLAIM's own delivery is not counted)."""
    info = r.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
    return max(1, int(info[0]["times_delivered"]) - 1) if info else 1


def reclaim_stream_once(r: redis.Redis, stream: str, group: str, min_idle_s: float = RECLAIM_IDLE_S,
                        max_deliveries: int = MAX_DELIVERIES) -> dict[str, int]:
    counts = {"requeued": 0, "dead_lettered": 0, "dropped": 0}
    start = "0-0"
    while True:
        try:
            resp = r.xautoclaim(stream, group, RECLAIMER, int(min_idle_s * 1000), start_id=start, count=100)
        except redis.ResponseError as e:  # no such stream / group
            if "NOGROUP" in str(e) or "no such key" in str(e).lower():
                return counts
            raise
        nxt, claimed = resp[0], resp[1]
        for entry_id, fields in claimed:
            if fields is None:  # deleted (trimmed) while pending
                r.xack(stream, group, entry_id)
                continue
            n = _deliveries(r, stream, group, entry_id)
            if stream == S.REQUESTS:
                try:
                    cmd = S.decode(fields, S.RequestCommand)
                except Exception as e:
                    dead_letter(r, stream, group, entry_id, fields, n, f"malformed entry: {e}")
                    counts["dead_lettered"] += 1
                    continue
                total = cmd.deliveries + n
                if total >= max_deliveries:
                    reason = (f"request {cmd.request_id} was delivered {total} times without being processed "
                              f"(its consumer kept dying); moved to the dead-letter stream")
                    dead_letter(r, stream, group, entry_id, fields, total, reason)
                    if cmd.op == "add":
                        fail_request(r, cmd.request_id, reason, cmd.job_id,
                                     cmd.request.sampling.n if cmd.request else 1)
                    counts["dead_lettered"] += 1
                else:
                    again = cmd.model_copy(update={"deliveries": total})
                    p = r.pipeline(transaction=True)
                    p.xadd(stream, S.encode(again))
                    p.xack(stream, group, entry_id)
                    p.execute()
                    counts["requeued"] += 1
            else:
                if n >= max_deliveries:
                    dead_letter(r, stream, group, entry_id, fields, n, "stale entry of a dead consumer")
                    counts["dead_lettered"] += 1
                else:
                    r.xack(stream, group, entry_id)
                    counts["dropped"] += 1
        if nxt in ("0-0", b"0-0"):
            break
        start = nxt
    reclaimed = sum(counts.values())
    if reclaimed:
        r.hincrby(STATS, f"reclaimed:{stream}:{group}", reclaimed)
    return counts


def reclaim_pending_once(r: redis.Redis, min_idle_s: float = RECLAIM_IDLE_S,
                         max_deliveries: int = MAX_DELIVERIES) -> dict[str, dict[str, int]]:
    out = {
        S.REQUESTS: reclaim_stream_once(r, S.REQUESTS, S.SCHEDULER_GROUP, min_idle_s, max_deliveries),
        S.RESULTS: reclaim_stream_once(r, S.RESULTS, S.SCHEDULER_GROUP, min_idle_s, max_deliveries),
    }
    for stream in _plan_streams(r):
        out[stream] = reclaim_stream_once(r, stream, S.WORKER_GROUP, min_idle_s, max_deliveries)
    return out


# ------------------------------------------------------------------------------------------------
# Celery tasks


@app.task(name="pagedfleet.expire_jobs")
def expire_jobs() -> int:
    with _redis() as r:
        return len(expire_jobs_once(r))


@app.task(name="pagedfleet.trim_streams")
def trim_streams() -> dict:
    with _redis() as r:
        return trim_streams_once(r)


@app.task(name="pagedfleet.reclaim_pending")
def reclaim_pending() -> dict:
    with _redis() as r:
        out = reclaim_pending_once(r)
        r.hset(STATS, "last_reclaim_at", repr(time.time()))
        return out
