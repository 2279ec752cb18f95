"""The Redis writes of one output delta, queued on a pipeline (sync or asyncio): the scheduler's step
writes and local finishes, and Celery housekeeping's failed requests all go through here."""

from __future__ import annotations

from protocol import RequestOutputDelta
from protocol import streams as S
from protocol.job_store import set_job_status
from protocol.jobs import final_job_status


def queue_output_delta(p, delta: RequestOutputDelta, job_id: str | None, output_ttl_s: float,
                       job_ttl_s: float) -> None:
    """XADD the delta to its request's output stream. A final one also sets the stream's TTL (a job's
    results are kept longer), drops the request from ``pf:active`` and gives its job its final status."""
    key = S.output_stream(delta.request_id)
    p.xadd(key, S.encode(delta))
    if not delta.finished:
        return
    p.expire(key, int(job_ttl_s if job_id else output_ttl_s))
    p.hdel(S.ACTIVE, delta.request_id)
    if job_id:
        status = final_job_status(delta.error, [o.finish_reason for o in delta.outputs])
        set_job_status(p, job_id, status, delta.error)
