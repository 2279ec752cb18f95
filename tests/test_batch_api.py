"""The OpenAI Batch API on a real CPU fleet (redis, scheduler, one worker, the gateway with API keys, a
Celery batch worker), driven by the official `openai` client: a batch's output equals the same requests
sent one by one; malformed lines land in the error file; cancel mid-batch; SIGKILL of the batch worker
mid-batch, then a restart: every custom_id exactly once. And the block map hides other keys' request ids."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest
from openai.types import Batch, FileDeleted, FileObject

from fleet_harness import PY, Fleet

pytestmark = [pytest.mark.fleet]

MODEL = "smollm2-135m-instruct"
KEYS = ("sk-alice-0123456789", "sk-bob-0123456789")
PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "Count to three.", "Name a city."]


def start_batch_worker(fleet: Fleet):
    return fleet.start("batch", [PY, "-m", "celery", "-A", "gateway.batch.worker", "worker", "-Q",
                                 "pagedfleet-batch", "--pool", "threads", "--concurrency", "2", "--loglevel",
                                 "INFO", "--without-gossip", "--without-mingle"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from model_io.model_files import resolve_model

    env = {"PAGEDFLEET_API_KEYS": ",".join(KEYS), "PAGEDFLEET_MODEL_DIR": str(resolve_model(None).path),
           "PAGEDFLEET_SERVED_MODEL_NAME": MODEL, "PAGEDFLEET_BATCH_LEASE_S": "1",
           "PAGEDFLEET_BATCH_MAX_IN_FLIGHT": "3", "PAGEDFLEET_MAX_FILE_BYTES": str(64 * 1024)}
    f = Fleet(tmp_path_factory.mktemp("batch"), num_workers=1, max_model_len=512, env=env)
    start_batch_worker(f)
    yield f
    f.dump_logs(30)
    f.close()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)


def chat_line(cid: str, prompt: str, max_tokens: int = 8) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                     "temperature": 0}}


def jsonl(lines) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def raw_get(fleet, path: str, key: str = KEYS[0]) -> httpx.Response:
    return httpx.get(fleet.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def wait_batch(client, batch_id: str, until, timeout: float = 150.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if until(b):
            return b
        assert time.monotonic() < deadline, f"batch stuck: {b}"
        time.sleep(0.2)


def output_lines(client, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def submit_batch(client, lines, endpoint="/v1/chat/completions") -> Batch:
    f = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")


def test_batch_end_to_end_equals_requests_one_by_one(fleet, client):
    lines = [chat_line(f"req-{i}", p) for i, p in enumerate(PROMPTS)]
    lines.insert(2, "{not json")
    lines.insert(4, {**chat_line("bad-body", "x"), "body": {"messages": [], "max_tokens": "8"}})
    f = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    FileObject.model_validate(raw_get(fleet, f"/v1/files/{f.id}").json())
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "e2e"})
    assert b.status == "validating" and b.metadata == {"run": "e2e"}
    b = wait_batch(client, b.id, lambda b: b.status in ("completed", "failed", "cancelled", "expired"))
    Batch.model_validate(raw_get(fleet, f"/v1/batches/{b.id}").json())
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (8, 6, 2)
    assert b.in_progress_at and b.finalizing_at and b.completed_at
    out = output_lines(client, b.output_file_id)
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(len(PROMPTS))]
    for x, prompt in zip(out, PROMPTS):
        assert x["error"] is None and x["response"]["status_code"] == 200
        one = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=8, temperature=0)
        assert x["response"]["body"]["choices"][0]["message"]["content"] == one.choices[0].message.content
        assert x["response"]["body"]["usage"]["completion_tokens"] == one.usage.completion_tokens
    errors = output_lines(client, b.error_file_id)
    assert len(errors) == 2
    assert errors[0]["custom_id"] is None and "malformed JSON" in errors[0]["error"]["message"]
    assert errors[1]["custom_id"] == "bad-body" and errors[1]["response"]["status_code"] == 400
    assert "messages" in errors[1]["response"]["body"]["error"]["message"]
    assert FileObject.model_validate(raw_get(fleet, f"/v1/files/{b.output_file_id}").json()).purpose == "batch_output"


def test_completions_batch_and_listing(fleet, client):
    prompts = ["The capital of France is", "One, two, three,"]
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0}} for i, p in enumerate(prompts)]
    b = submit_batch(client, lines, endpoint="/v1/completions")
    b = wait_batch(client, b.id, lambda b: b.status == "completed")
    out = output_lines(client, b.output_file_id)
    for x, p in zip(out, prompts):
        one = client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        assert x["response"]["body"]["choices"][0]["text"] == one.choices[0].text
    assert b.error_file_id is None
    page = client.batches.list(limit=1)
    assert page.data[0].id == b.id and page.has_more
    ids = [x.id for x in client.batches.list(limit=100)]
    assert b.id in ids and len(ids) == len(set(ids))
    listed = raw_get(fleet, "/v1/batches?limit=1").json()
    assert listed["object"] == "list" and listed["first_id"] == listed["last_id"] == b.id
    nxt = raw_get(fleet, f"/v1/batches?limit=1&after={b.id}").json()
    assert nxt["data"] and nxt["data"][0]["id"] != b.id


def test_all_malformed_file_fails_validation(client):
    b = submit_batch(client, ["nope", '{"custom_id": 3}'])
    b = wait_batch(client, b.id, lambda b: b.status not in ("validating", "in_progress"))
    assert b.status == "failed" and b.errors.data[0].code == "invalid_file", b


def test_files_api_limits_and_delete(fleet, client):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (65 * 1024)), purpose="batch")
    assert e.value.status_code == 413 and "limit" in e.value.message
    f = client.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert client.files.content(f.id).content == b'{"a": 1}\n'
    assert FileDeleted.model_validate(client.files.delete(f.id).model_dump()).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_cancel_mid_batch(fleet, client):
    lines = [chat_line(f"k{i}", PROMPTS[i % len(PROMPTS)], max_tokens=48) for i in range(24)]
    b = submit_batch(client, lines)
    wait_batch(client, b.id, lambda b: b.request_counts.completed >= 1)
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled")
    b = wait_batch(client, b.id, lambda b: b.status == "cancelled", timeout=60)
    assert b.cancelling_at and b.cancelled_at
    assert 1 <= b.request_counts.completed < 24
    out = output_lines(client, b.output_file_id)
    assert len(out) == b.request_counts.completed and len({x["custom_id"] for x in out}) == len(out)
    deadline = time.monotonic() + 30  # the aborted lines leave nothing running
    while fleet.stats()["requests"]:
        assert time.monotonic() < deadline, fleet.stats()
        time.sleep(0.2)
    with pytest.raises(openai.APIStatusError) as e:
        client.batches.cancel((submit_done := wait_batch(client, submit_batch(client, lines[:1]).id,
                                                         lambda b: b.status == "completed")).id)
    assert e.value.status_code == 409 and submit_done.status == "completed"


def test_batch_survives_sigkill_of_its_worker(fleet, client):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(18)]
    b = submit_batch(client, [chat_line(f"s{i}", p, max_tokens=12) for i, p in enumerate(prompts)])
    wait_batch(client, b.id, lambda b: b.request_counts.completed >= 3)
    fleet.kill("batch", signal.SIGKILL)
    mid = client.batches.retrieve(b.id)
    assert mid.status == "in_progress" and mid.request_counts.completed < 18
    start_batch_worker(fleet)
    b = wait_batch(client, b.id, lambda b: b.status == "completed")
    out = output_lines(client, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"s{i}" for i in range(18))
    assert b.request_counts.completed == 18 and b.request_counts.failed == 0
    for x in out:
        i = int(x["custom_id"][1:])
        assert x["response"]["request_id"] == f"{b.id}-{i}"
    for i in (0, 17):  # greedy: a resumed line equals the request sent alone
        one = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                             max_tokens=12, temperature=0)
        got = next(x for x in out if x["custom_id"] == f"s{i}")
        assert got["response"]["body"]["choices"][0]["message"]["content"] == one.choices[0].message.content


def test_other_keys_see_no_batch_file_or_request_id(fleet, client):
    bob = openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=30)
    b = submit_batch(client, [chat_line("own", "Say hi.")])
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(b.input_file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(b.id)
    assert b.id not in [x.id for x in bob.batches.list()]
    job = httpx.post(fleet.url + "/v1/jobs", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200,
                                                   "ignore_eos": True},
                     headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30).json()
    seen_by_owner = False
    deadline = time.monotonic() + 60
    while not seen_by_owner and time.monotonic() < deadline:
        mine, theirs = raw_get(fleet, "/v1/block-map").text, raw_get(fleet, "/v1/block-map", KEYS[1]).text
        assert job["id"] not in theirs
        seen_by_owner = job["id"] in mine
        if seen_by_owner:
            assert "(hidden)" in theirs
    assert seen_by_owner
    assert raw_get(fleet, f"/v1/jobs/{job['id']}", KEYS[1]).status_code == 404
    httpx.delete(fleet.url + f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10)
    wait_batch(client, b.id, lambda b: b.status == "completed")


def test_file_store_in_a_directory(tmp_path):
    """With `files_dir` set, a file's bytes live in that directory (written whole, then renamed)."""
    import asyncio

    from fleet_harness import RedisServer
    from gateway.file_store import FileStore
    from gateway.settings import GatewaySettings
    from protocol.redis_conn import async_client

    redis = RedisServer(tmp_path / "redis")

    async def scenario():
        r = async_client(redis.url, decode_responses=True)
        store = FileStore(r, GatewaySettings(redis_url=redis.url, files_dir=str(tmp_path / "files")))
        obj = await store.create("owner-a", "in.jsonl", "batch", b'{"x": 1}\n')
        assert (tmp_path / "files" / obj["id"]).read_bytes() == b'{"x": 1}\n'
        assert not await r.exists(f"pf:file:{obj['id']}:data")
        assert await store.read(obj["id"]) == b'{"x": 1}\n'
        assert await store.get(obj["id"], "owner-b") is None and (await store.get(obj["id"], "owner-a"))["bytes"] == 9
        await store.delete(obj["id"], "owner-a")
        assert not (tmp_path / "files" / obj["id"]).exists() and await store.get(obj["id"], "owner-a") is None
        await r.aclose()

    try:
        asyncio.run(scenario())
    finally:
        redis.stop()
