"""API keys, ownership and rate limits at a real gateway process (real redis-server, no scheduler and no
worker: jobs stay queued, which is all these checks need)."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fleet_harness import PY, REPO, RedisServer, _stop, free_port

pytestmark = [pytest.mark.fleet]

MODEL = "smollm2-135m-instruct"
ALICE, BOB, BURST, TOKENS, FROM_FILE = "sk-alice-1", "sk-bob-2", "sk-burst-3", "sk-tokens-4", "sk-file-5"
CAROL, DAVE = "sk-carol-6", "sk-dave-7"  # the Idempotency-Key tests' own keys (own rate-limit buckets)
RPM, TPM = 30, 1000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from model_io.model_files import resolve_model

    work = tmp_path_factory.mktemp("auth")
    redis = RedisServer(work / "redis")
    keyfile = work / "keys.txt"
    keyfile.write_text(f"# extra keys\n{FROM_FILE}\n\n")
    port = free_port()
    env = {"PYTHONPATH": str(REPO), "REDIS_URL": redis.url, "PAGEDFLEET_MAX_MODEL_LEN": "512",
           "PAGEDFLEET_API_KEYS": f"{ALICE},{BOB},{BURST},{TOKENS},{CAROL},{DAVE}", "PAGEDFLEET_RATE_LIMIT_RPM": str(RPM),
           "PAGEDFLEET_RATE_LIMIT_TPM": str(TPM), "PATH": "/usr/bin:/bin"}
    log = open(work / "gateway.log", "wb")
    proc = subprocess.Popen([PY, "-m", "gateway.app", "--host", "127.0.0.1", "--port", str(port), "--model-dir",
                             str(resolve_model(None).path), "--served-model-name", MODEL,
                             "--api-key-file", str(keyfile)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/health", timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((work / "gateway.log").read_text())
            time.sleep(0.2)
    yield url
    _stop(proc)
    log.close()
    redis.stop()


def get(url, path, key=None):
    return httpx.get(url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)


def new_job(url, key, prompt="Hello", max_tokens=8, idempotency_key=None):
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(url + "/v1/jobs", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens},
                      headers=headers, timeout=30)


def test_401_without_a_valid_key_200_with_one(gateway):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {ALICE}"}):
        r = httpx.get(gateway + "/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and err["message"]
    assert get(gateway, "/v1/models", ALICE).status_code == 200
    assert get(gateway, "/v1/models", FROM_FILE).status_code == 200  # a key from --api-key-file
    assert get(gateway, "/health").status_code != 401  # open (503 here: no scheduler, no worker)
    assert get(gateway, "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=gateway + "/v1", api_key=ALICE, max_retries=0).models.list().data[0].id == MODEL


def test_jobs_are_visible_only_to_their_key_and_listed(gateway):
    mine = [new_job(gateway, ALICE, f"prompt {i}").json() for i in range(3)]
    theirs = new_job(gateway, BOB).json()
    for j in mine + [theirs]:
        assert re.fullmatch(r"job-[0-9a-f]{32}", j["id"]), j["id"]  # uuid4: unguessable
    assert get(gateway, f"/v1/jobs/{mine[0]['id']}", ALICE).status_code == 200
    r = get(gateway, f"/v1/jobs/{mine[0]['id']}", BOB)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = httpx.delete(gateway + f"/v1/jobs/{mine[0]['id']}", headers={"Authorization": f"Bearer {BOB}"}, timeout=10)
    assert r.status_code == 404
    listed = get(gateway, "/v1/jobs", ALICE).json()
    assert listed["object"] == "list" and [j["id"] for j in listed["data"]] == [j["id"] for j in reversed(mine)]
    assert [j["id"] for j in get(gateway, "/v1/jobs", BOB).json()["data"]] == [theirs["id"]]
    first = get(gateway, "/v1/jobs?limit=2", ALICE).json()
    assert len(first["data"]) == 2 and first["has_more"] and first["last_id"] == mine[1]["id"]
    rest = get(gateway, f"/v1/jobs?limit=2&after={first['last_id']}", ALICE).json()
    assert [j["id"] for j in rest["data"]] == [mine[0]["id"]] and not rest["has_more"]
    assert get(gateway, f"/v1/jobs?after={theirs['id']}", ALICE).status_code == 404  # not a cursor of theirs
    r = httpx.delete(gateway + f"/v1/jobs/{mine[1]['id']}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    cancelled = get(gateway, "/v1/jobs?status=cancelled", ALICE).json()["data"]
    assert [j["id"] for j in cancelled] == [mine[1]["id"]]
    assert mine[1]["id"] not in [j["id"] for j in get(gateway, "/v1/jobs?status=queued", ALICE).json()["data"]]
    assert get(gateway, "/v1/jobs?status=bogus", ALICE).status_code == 400
    assert get(gateway, "/v1/jobs?limit=0", ALICE).status_code == 400


def test_files_and_batches_are_visible_only_to_their_key(gateway):
    alice = openai.OpenAI(base_url=gateway + "/v1", api_key=ALICE, max_retries=0)
    bob = openai.OpenAI(base_url=gateway + "/v1", api_key=BOB, max_retries=0)
    f = alice.files.create(file=("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                                             b'"body": {"prompt": "hi"}}\n'), purpose="batch")
    assert re.fullmatch(r"file-[0-9a-f]{32}", f.id)
    for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id), lambda: bob.files.delete(f.id),
                 lambda: bob.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert re.fullmatch(r"batch_[0-9a-f]{32}", b.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(b.id)
    assert [x.id for x in bob.batches.list()] == [] and [x.id for x in bob.files.list()] == []
    assert alice.batches.retrieve(b.id).id == b.id and f.id in [x.id for x in alice.files.list()]
    assert alice.batches.cancel(b.id).status == "cancelling"  # no batch worker here: it stays cancelling


def test_request_rate_limit_gives_429_at_the_configured_rate(gateway):
    t0 = time.monotonic()
    codes, retry_after = [], []
    with httpx.Client(headers={"Authorization": f"Bearer {BURST}"}, timeout=10) as c:
        for _ in range(RPM + 15):
            r = c.get(gateway + "/v1/models")
            codes.append(r.status_code)
            if r.status_code == 429:
                retry_after.append(int(r.headers["Retry-After"]))
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
    elapsed = time.monotonic() - t0
    ok = codes.count(200)
    # the bucket holds a minute's worth (the burst) and refills at RPM / 60 per second
    assert RPM <= ok <= RPM + int(elapsed * RPM / 60) + 1, (ok, elapsed)
    assert codes.count(429) == len(codes) - ok and codes[:RPM] == [200] * RPM
    assert retry_after and all(1 <= s <= 3 for s in retry_after)
    assert get(gateway, "/v1/models", ALICE).status_code == 200  # another key has its own bucket
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=gateway + "/v1", api_key=BURST, max_retries=0).models.list()


def test_token_rate_limit(gateway):
    accepted = 0
    for _ in range(15):
        r = new_job(gateway, TOKENS, "Hello", max_tokens=100)
        if r.status_code == 429:
            assert "tokens per minute" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
            break
        assert r.status_code == 202, r.text
        accepted += 1
    # each job costs its prompt tokens + 100: about TPM / 100 of them fit in the burst
    assert TPM // 120 <= accepted <= TPM // 100, accepted


def test_bad_file_and_batch_requests_are_4xx_with_a_message(gateway):
    h = {"Authorization": f"Bearer {ALICE}"}
    r = httpx.post(gateway + "/v1/files", json={"purpose": "batch"}, headers=h, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(gateway + "/v1/files", files={"file": ("x.jsonl", b"\xff\xfe")}, data={"purpose": "batch"},
                   headers=h, timeout=10)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    fid = httpx.post(gateway + "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"},
                     headers=h, timeout=10).json()["id"]
    for body, word in (({"input_file_id": fid, "endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
                       ({"input_file_id": fid, "endpoint": "/v1/completions", "completion_window": "1h"},
                        "completion_window"),
                       ({"input_file_id": "file-nope", "endpoint": "/v1/completions"}, "No such File"),
                       ({"endpoint": "/v1/completions"}, "input_file_id")):
        r = httpx.post(gateway + "/v1/batches", json=body, headers=h, timeout=10)
        assert 400 <= r.status_code < 500 and word in r.json()["error"]["message"], r.text
    assert get(gateway, "/v1/batches/batch_nope", ALICE).status_code == 404


def test_job_posts_with_one_idempotency_key_make_one_job(gateway):
    with ThreadPoolExecutor(8) as pool:  # a client retrying while its first try is still in flight
        answers = list(pool.map(lambda _: new_job(gateway, CAROL, "Say hi.", idempotency_key="order-17"), range(8)))
    assert [r.status_code for r in answers] == [202] * 8, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sorted(r.headers.get("Idempotent-Replayed", "") for r in answers) == [""] + ["true"] * 7
    job_id = answers[0].json()["id"]
    assert [j["id"] for j in get(gateway, "/v1/jobs", CAROL).json()["data"]] == [job_id]

    r = new_job(gateway, CAROL, "Say bye.", idempotency_key="order-17")  # the key reused for another body
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
    assert "different request body" in r.json()["error"]["message"] and r.json()["error"]["type"]
    other = new_job(gateway, DAVE, "Say hi.", idempotency_key="order-17")  # another API key's key is its own
    fresh = new_job(gateway, CAROL, "Say hi.", idempotency_key="order-18")
    assert other.status_code == fresh.status_code == 202
    assert len({job_id, other.json()["id"], fresh.json()["id"]}) == 3
    assert "Idempotent-Replayed" not in other.headers and "Idempotent-Replayed" not in fresh.headers
    assert [j["id"] for j in get(gateway, "/v1/jobs", DAVE).json()["data"]] == [other.json()["id"]]
    r = new_job(gateway, CAROL, "Say hi.", idempotency_key="k" * 256)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key", r.text


def test_batch_creates_with_one_idempotency_key_make_one_batch(gateway):
    carol = openai.OpenAI(base_url=gateway + "/v1", api_key=CAROL, max_retries=0)
    f = carol.files.create(file=("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                                             b'"body": {"prompt": "hi"}}\n'), purpose="batch")
    once = {"Idempotency-Key": "nightly-2026-12-07"}
    first = carol.batches.with_raw_response.create(input_file_id=f.id, endpoint="/v1/completions",
                                                   completion_window="24h", metadata={"run": "a"}, extra_headers=once)
    again = carol.batches.with_raw_response.create(input_file_id=f.id, endpoint="/v1/completions",
                                                   completion_window="24h", metadata={"run": "a"}, extra_headers=once)
    assert first.parse().id == again.parse().id and again.parse().metadata == {"run": "a"}
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert [b.id for b in carol.batches.list()] == [first.parse().id]
    carol.files.delete(f.id)  # a retry after the input file is gone still names the batch it made
    assert carol.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                metadata={"run": "a"}, extra_headers=once).id == first.parse().id
    with pytest.raises(openai.UnprocessableEntityError, match="different request body"):
        carol.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                             metadata={"run": "b"}, extra_headers=once)
    with pytest.raises(openai.NotFoundError):  # without the key: a new batch, over a file that is gone
        carol.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
