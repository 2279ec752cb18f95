"""Housekeeping with Celery (+ celery beat): broker and result backend are the fleet's Redis; JSON only.

    celery -A scheduler.server.housekeeping worker -B --pool solo --concurrency 1 -Q pagedfleet-housekeeping

Periodic tasks (celery beat, in-memory schedule: no shelve file, no pickle):

* ``expire_jobs``: delete finished jobs (and their output streams) older than their TTL.
* ``trim_streams``: trim the requests / results / plan / dead-letter streams to about their bound,
  never past an entry a consumer group has not read or acknowledged (XTRIM MINID).
* ``reclaim_pending``: entries a consumer left pending for longer than ``reclaim_idle_s``
  (its consumer died) are claimed with XAUTOCLAIM. A request entry is put back on the stream (its
  ``deliveries`` count carried along) unless it was delivered ``max_deliveries`` times: then
  it goes to the dead-letter stream ``pf:dead`` and its request fails with a clear error (a final
  RequestOutputDelta with ``error`` on its output stream; its job, if any, becomes ``failed``). Result
  and plan entries of a dead consumer are stale (their requests are resumed by recompute): they are
  acknowledged and counted.

The functions are plain functions of a sync Redis client too (``*_once(r, ...)``), for tests and tools.
Settings are ``SchedulerSettings`` (environment ``PAGEDFLEET_*``), read when the Celery app is first
asked for (``make_app``, or this module's ``app``), never at import.
"""

from __future__ import annotations

import functools
import logging
import time

import redis
from celery import Celery

from protocol import FinishReason, RequestOutputDelta, SequenceOutputDelta
from protocol import streams as S
from protocol.redis_conn import sync_client
from protocol.jobs import JobMeta
from protocol.celery_app import json_celery_app
from scheduler.server.config import SchedulerSettings
from scheduler.server.output_streams import queue_output_delta
from scheduler.server.stream_trim import safe_trim_minid

log = logging.getLogger("pagedfleet.housekeeping")

QUEUE = "pagedfleet-housekeeping"
STATS = S.HOUSEKEEPING_STATS
RECLAIMER = "housekeeper"

def make_app(settings: SchedulerSettings) -> Celery:
    """The Celery app: broker and backend on the fleet's Redis, JSON only, beat's schedule in memory."""
    period = settings.housekeeping_period_s
    app = json_celery_app(
        "pagedfleet", settings.redis_url, log_level=settings.log_level, log_format=settings.log_format,
        backend=True, task_default_queue=QUEUE, task_ignore_result=True, result_expires=3600,
        beat_scheduler="celery.beat:Scheduler",  # in memory: the default PersistentScheduler pickles to a shelve
        beat_schedule={
            "expire-jobs": {"task": "pagedfleet.expire_jobs", "schedule": period * 2},
            "trim-streams": {"task": "pagedfleet.trim_streams", "schedule": period * 2},
            "reclaim-pending": {"task": "pagedfleet.reclaim_pending", "schedule": period},
        },
    )
    _register_tasks(app, settings)
    return app


@functools.cache
def _default_app() -> Celery:
    return make_app(SchedulerSettings())


def __getattr__(name: str) -> Celery:
    # `celery -A scheduler.server.housekeeping` asks for `app`: built (and the environment read) only then
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# expire jobs


def expire_jobs_once(r: redis.Redis, now: float | None = None, default_ttl_s: float = S.JOB_TTL_S) -> list[str]:
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
                m = JobMeta.model_validate_json(meta)
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
        out[stream] = safe_trim_minid(r, stream, maxlen)
    for stream in _plan_streams(r):
        out[stream] = safe_trim_minid(r, stream, S.PLAN_MAXLEN)
    r.xtrim(S.DEAD_LETTER, maxlen=S.DEAD_MAXLEN, approximate=True) if r.exists(S.DEAD_LETTER) else None
    return out


# ------------------------------------------------------------------------------------------------
# reclaim pending entries of dead consumers


def fail_request(r, request_id: str, error: str, job_id: str | None = None, n: int = 1,
                 output_ttl_s: float = S.OUTPUT_TTL_S, job_ttl_s: float = S.JOB_TTL_S) -> None:
    """Finish a request with an error the gateway shows (and its job, if any, as failed)."""
    delta = RequestOutputDelta(request_id=request_id, finished=True, error=error,
                               outputs=[SequenceOutputDelta(index=i, finish_reason=FinishReason.ERROR)
                                        for i in range(n)])
    p = r.pipeline(transaction=True)
    queue_output_delta(p, delta, job_id, output_ttl_s, job_ttl_s)
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


def reclaim_stream_once(r: redis.Redis, stream: str, group: str, min_idle_s: float = S.RECLAIM_IDLE_S,
                        max_deliveries: int = S.MAX_DELIVERIES, output_ttl_s: float = S.OUTPUT_TTL_S,
                        job_ttl_s: float = S.JOB_TTL_S) -> dict[str, int]:
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
                                     cmd.request.sampling.n if cmd.request else 1, output_ttl_s, job_ttl_s)
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


def reclaim_pending_once(r: redis.Redis, min_idle_s: float = S.RECLAIM_IDLE_S,
                         max_deliveries: int = S.MAX_DELIVERIES, output_ttl_s: float = S.OUTPUT_TTL_S,
                         job_ttl_s: float = S.JOB_TTL_S) -> dict[str, dict[str, int]]:
    out = {
        S.REQUESTS: reclaim_stream_once(r, S.REQUESTS, S.SCHEDULER_GROUP, min_idle_s, max_deliveries,
                                        output_ttl_s, job_ttl_s),
        S.RESULTS: reclaim_stream_once(r, S.RESULTS, S.SCHEDULER_GROUP, min_idle_s, max_deliveries),
    }
    for stream in _plan_streams(r):
        out[stream] = reclaim_stream_once(r, stream, S.WORKER_GROUP, min_idle_s, max_deliveries)
    return out


# ------------------------------------------------------------------------------------------------
# Celery tasks


def _register_tasks(app: Celery, settings: SchedulerSettings) -> None:
    def connect() -> redis.Redis:
        return sync_client(settings.redis_url, decode_responses=True)

    @app.task(name="pagedfleet.expire_jobs")
    def expire_jobs() -> int:
        with connect() as r:
            return len(expire_jobs_once(r, default_ttl_s=settings.job_ttl_s))

    @app.task(name="pagedfleet.trim_streams")
    def trim_streams() -> dict:
        with connect() as r:
            return trim_streams_once(r)

    @app.task(name="pagedfleet.reclaim_pending")
    def reclaim_pending() -> dict:
        with connect() as r:
            out = reclaim_pending_once(r, settings.reclaim_idle_s, settings.max_deliveries, settings.output_ttl_s,
                                       settings.job_ttl_s)
            r.hset(STATS, "last_reclaim_at", repr(time.time()))
            return out
