"""The embedded Redis as `pagedfleet serve` runs it keeps streams, consumer groups, pending entries and
hashes across a SIGKILL (append-only file in its data directory)."""

from __future__ import annotations

import pytest



def test_serve_runs_redis_with_an_append_only_file(tmp_path):
    from pagedfleet.serve import redis_server_args

    argv = redis_server_args(6399, tmp_path, "always")
    opts = dict(zip(argv[1::2], argv[2::2]))
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "always"
    assert opts["--dir"] == str(tmp_path) and opts["--bind"] == "127.0.0.1"
    with pytest.raises(ValueError):
        redis_server_args(6399, tmp_path, "sometimes")


def test_stream_group_pending_and_hash_survive_sigkill(durable_redis):
    r = durable_redis.client()
    ids = [r.xadd("pf:test", {"m": f"entry{i}"}) for i in range(3)]
    r.xgroup_create("pf:test", "grp", id="0")
    delivered = r.xreadgroup("grp", "c1", {"pf:test": ">"}, count=2)
    assert [e[0] for e in delivered[0][1]] == ids[:2]
    r.xack("pf:test", "grp", ids[0])  # ids[1] stays delivered and unacknowledged
    r.hset("pf:job:1", mapping={"status": "running", "prompt": "hi"})
    r.close()

    durable_redis.kill()
    durable_redis.start()

    r = durable_redis.client()
    assert r.xlen("pf:test") == 3
    pending = r.xpending_range("pf:test", "grp", min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], "c1")]
    assert r.hgetall("pf:job:1") == {"status": "running", "prompt": "hi"}
    # the group's last-delivered id survived too: only the undelivered entry is new
    again = r.xreadgroup("grp", "c2", {"pf:test": ">"}, count=10)
    assert [e[0] for e in again[0][1]] == [ids[2]]
    # and the pending entry can still be claimed by another consumer
    claimed = r.xclaim("pf:test", "grp", "c2", min_idle_time=0, message_ids=[ids[1]])
    assert [e[0] for e in claimed] == [ids[1]]
    r.close()
