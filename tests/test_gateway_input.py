"""Hostile input at a real gateway process (issue 12): what a client sees for each fault.

The gateway runs against a real redis-server with no scheduler and no worker: every check here
happens before a request is submitted; /health is degraded and says what is missing."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest

from fleet_harness import PY, REPO, RedisServer, _stop, free_port
from protocol import streams as S

pytestmark = [pytest.mark.fleet]

MODEL = "smollm2-135m-instruct"
MAX_LEN = 256
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from model_io.model_files import resolve_model

    work = tmp_path_factory.mktemp("gw")
    redis = RedisServer(work / "redis")
    port = free_port()
    env = {"PYTHONPATH": str(REPO), "REDIS_URL": redis.url, "PAGEDFLEET_MAX_MODEL_LEN": str(MAX_LEN),
           "PAGEDFLEET_MAX_BODY_BYTES": str(BODY_LIMIT), "PATH": "/usr/bin:/bin"}
    log = open(work / "gateway.log", "wb")
    proc = subprocess.Popen([PY, "-m", "gateway.app", "--host", "127.0.0.1", "--port", str(port), "--model-dir",
                             str(resolve_model(None).path), "--served-model-name", MODEL],
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
    yield url, redis
    _stop(proc)
    log.close()
    redis.stop()


def post(url, path, body, content_type="application/json", **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": content_type}, timeout=60, **kw)


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w.lower() in err["message"].lower(), err
    return err


LONE = '"\\ud800"'  # a lone surrogate, as JSON writes it


@pytest.mark.parametrize("path, raw, where", [
    ("/v1/completions", '{"prompt": %s}' % LONE, "prompt"),
    ("/v1/completions", '{"prompt": [%s, "ok"]}' % LONE, "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stop": %s}' % LONE, "stop"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["x", %s]}' % LONE, "stop"),
    ("/v1/completions", '{"prompt": "hi", "user": %s}' % LONE, "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}' % LONE, "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % LONE,
     "messages.0.content"),
    ("/v1/jobs", '{"prompt": %s}' % LONE, "prompt"),
    ("/v1/jobs", '{"prompt": "hi", "user": %s}' % LONE, "user"),
    ("/v1/jobs", '{"messages": [{"role": "user", "content": "x"}], "user": %s}' % LONE, "user"),
])
def test_invalid_unicode_is_400(gateway, path, raw, where):
    err = assert_error(post(gateway[0], path, raw), 400, "unicode", where)
    assert err["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(gateway):
    url = gateway[0]
    body = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)})
    err = assert_error(post(url, "/v1/completions", body), 413)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the gateway counts the bytes as they come
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert_error(r, 413)


def test_huge_prompt_does_not_stall_health(gateway):
    url = gateway[0]
    big = "hello world " * (BODY_LIMIT // 12 - 10)  # just under the limit: ~180k tokens to tokenise
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(url, "/v1/completions", {"prompt": big})))
    t.start()
    time.sleep(0.3)
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        httpx.get(url + "/health", timeout=30)
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    assert_error(result["r"], 400, "context")
    assert worst < 1.0, worst


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens"),
    ({"prompt": [1] * MAX_LEN}, "prompt"),
])
def test_context_length_exceeded(gateway, body, param):
    err = assert_error(post(gateway[0], "/v1/completions", body), 400, param)
    assert err["code"] == "context_length_exceeded" and err["param"] == param


def test_chat_max_tokens_beyond_context(gateway):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_LEN}
    err = assert_error(post(gateway[0], "/v1/chat/completions", body), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": ["p"] * 65}, ["prompt"]),
    ("/v1/completions", {"prompt": "hi", "stop": ["s"] * 17}, ["stop"]),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 257}, ["stop"]),
    ("/v1/completions", {"prompt": "hi", "n": 17}, ["n"]),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, ["logprobs"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, ["top_logprobs"]),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, ["stream"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "16"}, ["max_tokens"]),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, ["temperature"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, ["logprobs"]),
    ("/v1/jobs", {"prompt": "hi", "stream": "yes"}, ["stream"]),
    ("/v1/jobs", {"prompt": "hi", "kind": "embedding"}, ["kind"]),
])
def test_limits_and_strict_types(gateway, path, body, words):
    assert_error(post(gateway[0], path, body), 400, *words)


def test_non_json_body_is_415(gateway):
    for path in ("/v1/jobs", "/v1/completions", "/v1/chat/completions"):
        err = assert_error(post(gateway[0], path, '{"prompt": "hi"}', content_type="text/plain"), 415,
                           "application/json")
        assert err["code"] == "unsupported_media_type"


def test_openapi_has_every_body_and_the_limits(gateway):
    spec = httpx.get(gateway[0] + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/jobs"):
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    comp = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert comp["n"]["maximum"] == 16 and comp["logprobs"]["anyOf"][0]["maximum"] == 20
    assert any(a.get("maxItems") == 64 for a in comp["prompt"]["anyOf"])


def test_405_carries_allow(gateway):
    r = httpx.put(gateway[0] + "/v1/completions", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = httpx.post(gateway[0] + "/v1/jobs/job-x", timeout=10)
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}
    assert "error" in r.json()


def test_health_degraded_names_what_is_missing(gateway):
    url, redis = gateway
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 503
    h = r.json()
    assert h["status"] == "degraded" and h["missing"] == ["scheduler", "workers"] and h["redis"] is True
    rc = redis.client()
    rc.set(S.SCHEDULER_INFO, "test-scheduler", px=60_000)  # a scheduler holds its lease
    try:
        h = httpx.get(url + "/health", timeout=10).json()
        assert h["status"] == "degraded" and h["missing"] == ["workers"] and h["scheduler"] is True
    finally:
        rc.delete(S.SCHEDULER_INFO)
        rc.close()
