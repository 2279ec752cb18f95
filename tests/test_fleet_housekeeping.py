"""Redis Streams transport and Celery housekeeping against a real redis-server (no model, no torch)."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from fleet_harness import RedisServer
from protocol import GenerationRequest, RequestOutputDelta, SamplingParams, StepPlan
from protocol import streams as S
from protocol.job_store import set_job_status
from protocol.jobs import JobMeta
from scheduler.server.stream_trim import safe_trim_minid


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def r(redis_server):
    c = redis_server.client()
    c.flushall()
    yield c
    c.close()


def test_codec_roundtrip_and_bad_entries():
    req = GenerationRequest(request_id="a", prompt_token_ids=[1, 2], sampling=SamplingParams(n=2, stop=["x"]))
    cmd = S.RequestCommand(op="add", request_id="a", request=req)
    assert S.decode(S.encode(cmd), S.RequestCommand) == cmd
    plan = StepPlan(step_id=3, block_copies=[(1, 2)])
    assert S.decode({b"m": S.encode(plan)["m"].encode()}, StepPlan) == plan
    with pytest.raises(ValidationError):
        S.decode({"m": '{"op": "add", "request_id": 5}'}, S.RequestCommand)
    with pytest.raises(ValidationError):  # unknown fields are rejected, not ignored
        S.decode({"m": '{"op": "abort", "request_id": "a", "extra": 1}'}, S.RequestCommand)
    with pytest.raises(KeyError):
        S.decode({"x": "{}"}, S.RequestCommand)


def test_safe_trim_keeps_unread_and_unacknowledged(r):
    ids = [r.xadd("s", {"m": str(i)}) for i in range(50)]
    r.xgroup_create("s", "g", id="0")
    got = r.xreadgroup("g", "c", {"s": ">"}, count=30)[0][1]
    assert len(got) == 30
    r.xack("s", "g", *[e for e, _ in got[:20]])  # 20..29 pending, 30..49 unread
    safe_trim_minid(r, "s", maxlen=5)
    left = [e for e, _ in r.xrange("s")]
    assert left == ids[20:]
    r.xack("s", "g", *[e for e, _ in got[20:]])
    rest = r.xreadgroup("g", "c", {"s": ">"})[0][1]
    r.xack("s", "g", *[e for e, _ in rest])
    safe_trim_minid(r, "s", maxlen=5)
    assert [e for e, _ in r.xrange("s")] == ids[45:]


def _job(r, job_id, finished_at=None, ttl=60):
    meta = JobMeta(job_id=job_id, kind="completion", model="m", body={"prompt": "x"}, request_id=job_id,
                     prompt_token_ids=[1], sampling=SamplingParams(), created_at=time.time(), ttl_s=ttl)
    r.hset(S.job_key(job_id), mapping={"meta": meta.model_dump_json(), "status": "queued"})
    r.xadd(S.output_stream(job_id), {"m": "{}"})
    if finished_at is not None:
        r.hset(S.job_key(job_id), mapping={"status": "completed", "finished_at": finished_at})
        r.zadd(S.JOBS_FINISHED, {job_id: finished_at})


def test_job_status_never_leaves_a_terminal_state(r):
    _job(r, "j1")
    assert set_job_status(r, "j1", "running") == 1
    assert set_job_status(r, "j1", "cancelled") == 1
    assert set_job_status(r, "j1", "completed") == 0
    assert r.hget(S.job_key("j1"), "status") == "cancelled"
    assert r.zscore(S.JOBS_FINISHED, "j1") is not None
    assert set_job_status(r, "missing", "running") == 0
    assert not r.exists(S.job_key("missing"))


def test_expire_jobs(r):
    from scheduler.server.housekeeping import expire_jobs_once

    now = time.time()
    _job(r, "old", finished_at=now - 120, ttl=60)
    _job(r, "new", finished_at=now - 10, ttl=60)
    _job(r, "running")
    assert expire_jobs_once(r, now=now) == ["old"]
    assert not r.exists(S.job_key("old")) and not r.exists(S.output_stream("old"))
    assert r.exists(S.job_key("new")) and r.exists(S.job_key("running"))


def test_reclaim_requeues_then_dead_letters_and_fails_the_request(r):
    from scheduler.server.housekeeping import reclaim_pending_once

    r.xgroup_create(S.REQUESTS, S.SCHEDULER_GROUP, id="0", mkstream=True)
    _job(r, "job-1")
    req = GenerationRequest(request_id="job-1", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(n=2))
    r.xadd(S.REQUESTS, S.encode(S.RequestCommand(op="add", request_id="job-1", request=req, job_id="job-1")))
    rounds = 0
    while True:
        # a consumer reads the entry and dies without acknowledging it
        got = r.xreadgroup(S.SCHEDULER_GROUP, "doomed", {S.REQUESTS: ">"}, count=10)
        assert got and len(got[0][1]) == 1
        out = reclaim_pending_once(r, min_idle_s=0, max_deliveries=3)[S.REQUESTS]
        rounds += 1
        if out["dead_lettered"]:
            break
        assert out["requeued"] == 1
        cmd = S.decode(r.xrevrange(S.REQUESTS, count=1)[0][1], S.RequestCommand)
        assert cmd.request_id == "job-1" and cmd.deliveries == rounds
        assert rounds < 5
    assert r.xpending(S.REQUESTS, S.SCHEDULER_GROUP)["pending"] == 0
    dead = [S.decode(f, S.DeadLetter) for _, f in r.xrange(S.DEAD_LETTER)]
    assert len(dead) == 1 and "job-1" in dead[0].reason and "dead-letter" in dead[0].reason
    final = S.decode(r.xrange(S.output_stream("job-1"))[-1][1], RequestOutputDelta)
    assert final.finished and "delivered" in final.error
    assert [o.finish_reason.value for o in final.outputs] == ["error", "error"]
    assert r.hget(S.job_key("job-1"), "status") == "failed"
    assert "delivered" in r.hget(S.job_key("job-1"), "error")


def test_reclaim_drops_stale_results_of_a_dead_consumer(r):
    from scheduler.server.housekeeping import reclaim_pending_once

    r.xgroup_create(S.RESULTS, S.SCHEDULER_GROUP, id="0", mkstream=True)
    r.xadd(S.RESULTS, {"m": "{}"})
    r.xreadgroup(S.SCHEDULER_GROUP, "dead-scheduler", {S.RESULTS: ">"})
    assert reclaim_pending_once(r, min_idle_s=0)[S.RESULTS]["dropped"] == 1
    assert r.xpending(S.RESULTS, S.SCHEDULER_GROUP)["pending"] == 0


def test_trim_streams_task(r):
    from scheduler.server.housekeeping import trim_streams_once

    r.xgroup_create(S.RESULTS, S.SCHEDULER_GROUP, id="$", mkstream=True)
    for i in range(S.RESULTS_MAXLEN + 50):
        r.xadd(S.RESULTS, {"m": str(i)})
    trim_streams_once(r)  # nothing read yet: nothing may go
    assert r.xlen(S.RESULTS) == S.RESULTS_MAXLEN + 50
    while got := r.xreadgroup(S.SCHEDULER_GROUP, "c", {S.RESULTS: ">"}, count=5000):
        r.xack(S.RESULTS, S.SCHEDULER_GROUP, *[e for e, _ in got[0][1]])
    trim_streams_once(r)
    assert r.xlen(S.RESULTS) == S.RESULTS_MAXLEN


def test_celery_is_json_only_and_beat_does_not_pickle():
    from scheduler.server.housekeeping import app

    c = app.conf
    assert c.task_serializer == "json" and c.result_serializer == "json"
    assert list(c.accept_content) == ["json"] and list(c.result_accept_content) == ["json"]
    assert c.beat_scheduler == "celery.beat:Scheduler"
    assert {"pagedfleet.expire_jobs", "pagedfleet.trim_streams", "pagedfleet.reclaim_pending"} <= set(app.tasks)


def test_celery_worker_runs_the_tasks(redis_server, tmp_path):
    """A real Celery worker (solo pool) on the same Redis runs a housekeeping task sent as JSON."""
    import subprocess
    import sys

    from fleet_harness import REPO, _stop

    r = redis_server.client()
    r.flushall()
    env = {**__import__("os").environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "celery.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "scheduler.server.housekeeping", "worker", "--pool", "solo",
                             "-Q", "pagedfleet-housekeeping", "--without-gossip", "--without-mingle", "--loglevel",
                             "INFO"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from celery import Celery

        client = Celery("client", broker=redis_server.url, backend=redis_server.url)
        client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
        _job(r, "stale", finished_at=time.time() - 10**6, ttl=1)
        client.send_task("pagedfleet.reclaim_pending", queue="pagedfleet-housekeeping")
        client.send_task("pagedfleet.expire_jobs", queue="pagedfleet-housekeeping")
        deadline = time.time() + 60
        while time.time() < deadline and (r.exists(S.job_key("stale")) or not r.hget(
                "pf:housekeeping:stats", "last_reclaim_at")):
            time.sleep(0.25)
        assert not r.exists(S.job_key("stale")), (tmp_path / "celery.log").read_text()
        assert r.hget("pf:housekeeping:stats", "last_reclaim_at")
        # every message on the broker queue was JSON
    finally:
        _stop(proc)
        log.close()
