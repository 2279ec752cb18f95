"""The one Redis operation on jobs that several services run (the scheduler, Celery housekeeping and the
gateway): a job's status change, which never leaves a terminal state. Takes any redis client or pipeline,
sync or asyncio (returns its reply)."""

from __future__ import annotations

import time

from protocol.jobs import JobStatus
from protocol.streams import JOBS_FINISHED, job_key

SET_JOB_STATUS_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
if cur == 'completed' or cur == 'failed' or cur == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[1] == 'completed' or ARGV[1] == 'failed' or ARGV[1] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
end
return 1
"""


def set_job_status(r, job_id: str, status: JobStatus | str, error: str | None = None):
    """Set a job's status unless it is already terminal."""
    status = JobStatus(status).value
    return r.eval(SET_JOB_STATUS_LUA, 2, job_key(job_id), JOBS_FINISHED, status, repr(time.time()), error or "", job_id)
