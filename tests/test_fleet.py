"""The fleet end to end: real redis-server, scheduler service, two CPU workers, gateway, Celery
housekeeping; the official openai client; outputs compared with the offline engine (pagedfleet.llm.LLM).

The last test SIGKILLs a worker, so it stays last in this module."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleet_harness import module_fleet
from protocol import RequestOutputDelta, SamplingParams
from protocol import streams as S

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about the sea:",
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "fleet", num_workers=2, num_gpu_blocks=512, max_model_len=2048,
                            housekeeping=True, env={"PAGEDFLEET_HOUSEKEEPING_PERIOD_S": "5"})


@pytest.fixture(scope="module")
def llm():
    import torch

    from pagedfleet.llm import LLM

    torch.set_num_threads(1)  # the fleet's processes share the machine: no oversubscription
    return LLM(None, num_gpu_blocks=512, max_model_len=2048)


@pytest.fixture(scope="module")
def client(fleet):
    import openai

    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def offline(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params))[0].outputs


def test_health_models_metrics(fleet, client):
    h = httpx.get(fleet.url + "/health").json()
    assert h["status"] == "ok" and h["workers"] == 2
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(fleet.url + "/metrics").status_code == 200
    sd = httpx.get(fleet.scheduler_url + "/sd").json()
    assert sorted(t["labels"]["worker"] for t in sd) == ["worker0", "worker1"]
    for t in sd:  # every advertised target really serves Prometheus metrics
        assert "pagedfleet_worker" in httpx.get(f"http://{t['targets'][0]}/metrics").text
    bm = httpx.get(fleet.scheduler_url + "/block-map").json()
    assert sorted(w["worker_id"] for w in bm["workers"]) == ["worker0", "worker1"]
    assert all(len(w["gpu"]) == 512 for w in bm["workers"])


def test_greedy_completions_equal_offline_and_spread_over_workers(fleet, client, llm):
    before = {wid: s["num_finished"] for wid, s in fleet.stats()["workers"].items()}
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        got = list(ex.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0),
                          PROMPTS))
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    for g, w in zip(got, want):
        assert g.choices[0].text == w.outputs[0].text
        assert g.choices[0].finish_reason == w.outputs[0].finish_reason
        assert g.usage.completion_tokens == len(w.outputs[0].token_ids)
        assert g.usage.prompt_tokens == len(w.prompt_token_ids)
    after = {wid: s["num_finished"] for wid, s in fleet.stats()["workers"].items()}
    served = {wid: after[wid] - before.get(wid, 0) for wid in after}
    assert sum(served.values()) == len(PROMPTS)
    assert all(v >= 1 for v in served.values()), served


def test_chat_equals_offline(client, llm):
    msgs = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}]
    got = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    want = llm.chat(msgs, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason


def test_streaming_completion_and_chat(client):
    kw = dict(model=MODEL, max_tokens=10, temperature=0)
    full = client.completions.create(prompt=PROMPTS[2], **kw)
    chunks = list(client.completions.create(prompt=PROMPTS[2], stream=True,
                                            stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices

    msgs = [{"role": "user", "content": "Name a fruit."}]
    full = client.chat.completions.create(messages=msgs, **kw)
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n2_seeded_sampling_equals_offline(client, llm):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[5], n=2, max_tokens=6, temperature=1.0, seed=1234)
    want = offline(llm, PROMPTS[5], n=2, max_tokens=6, temperature=1.0, seed=1234)
    assert sorted(c.index for c in got.choices) == [0, 1]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    again = client.completions.create(model=MODEL, prompt=PROMPTS[5], n=2, max_tokens=6, temperature=1.0, seed=1234)
    assert [c.text for c in again.choices] == [c.text for c in got.choices]


def test_logprobs(client, llm):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    want = offline(llm, PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-3)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_stop_strings_are_exact(client, llm):
    ref = offline(llm, PROMPTS[2], max_tokens=24, temperature=0)[0].text
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]  # a stop string in the middle, possibly across tokens
    want = ref[: ref.index(stop)]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
                                          max_tokens=30, temperature=0)
    text = chat.choices[0].message.content
    if len(text) > 6:
        s = text[4:6]
        got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
                                             max_tokens=30, temperature=0, stop=[s])
        assert got.choices[0].message.content == text[: text.index(s)]
        assert got.choices[0].finish_reason == "stop"


def _post(fleet, path, content, **kw):
    headers = {"content-type": "application/json"}
    return httpx.post(fleet.url + path, content=content if isinstance(content, (str, bytes)) else json.dumps(content),
                      headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "smollm2-135m-instruct", "prompt": "hi"', 400, ["JSON"]),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, ["max_tokens"]),
    ({"model": MODEL, "prompt": 42}, 400, ["prompt"]),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, ["temperature"]),
    ({"model": "gpt-17", "prompt": "hi"}, 404, ["gpt-17"]),
    ({"model": MODEL, "prompt": "hello " * 2100}, 400, ["prompt", "context"]),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, ["n"]),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, ["top_p"]),
    ({"model": MODEL, "prompt": "hi", "frobnicate": True}, 400, ["frobnicate"]),
    ({"model": MODEL, "prompt": [999999]}, 400, ["prompt", "token"]),
    ({"model": MODEL}, 400, ["prompt"]),
])
def test_bad_completion_input(fleet, body, status, words):
    r = _post(fleet, "/v1/completions", body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    for w in words:
        assert w.lower() in msg.lower(), msg


def test_bad_chat_and_job_input_then_still_serving(fleet, client):
    for body, words in [({"model": MODEL, "messages": []}, ["messages"]),
                        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, ["role"]),
                        ({"model": MODEL, "messages": "hi"}, ["messages"]),
                        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, ["n"])]:
        r = _post(fleet, "/v1/chat/completions", body)
        assert r.status_code == 400, r.text
        assert all(w in r.json()["error"]["message"] for w in words)
    r = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": "hi", "stream": True})
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    r = _post(fleet, "/v1/jobs", "[1, 2]")
    assert r.status_code == 400
    r = httpx.get(fleet.url + "/v1/jobs/job-nope")
    assert r.status_code == 404 and "job-nope" in r.json()["error"]["message"]
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def _wait_job(fleet, job_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = httpx.get(f"{fleet.url}/v1/jobs/{job_id}").json()
        if j["status"] in statuses:
            return j
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {j['status']}")


def _wait_tokens(fleet, n_streams: int, n_entries: int = 3, timeout: float = 60) -> None:
    """Until `n_streams` output streams have `n_entries` deltas (their requests are generating)."""
    r = fleet.redis.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [k for k in r.scan_iter("pf:out:cmpl-*") if not _finished(r, k) and r.xlen(k) >= n_entries]
        if len(busy) >= n_streams:
            return
        time.sleep(0.05)
    raise TimeoutError("requests did not start generating")


def _finished(r, key) -> bool:
    last = r.xrevrange(key, count=1)
    return bool(last) and S.decode(last[0][1], RequestOutputDelta).finished


def _used_blocks(fleet) -> int:
    return sum(s["gpu_blocks_used"] for s in fleet.stats()["workers"].values())


def _wait_blocks_free(fleet, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _used_blocks(fleet) == 0 and not fleet.stats()["request_ids"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"blocks not freed: {fleet.stats()}")


def test_job_lifecycle(fleet, llm):
    r = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("job-")
    done = _wait_job(fleet, job["id"], ("completed",))
    want = offline(llm, PROMPTS[3], max_tokens=8, temperature=0)[0]
    assert done["result"]["choices"][0]["text"] == want.text
    assert done["result"]["usage"]["completion_tokens"] == 8 and done["finished_at"]
    chat = _post(fleet, "/v1/jobs", {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}],
                                     "max_tokens": 4, "temperature": 0}).json()
    done = _wait_job(fleet, chat["id"], ("completed",))
    assert done["kind"] == "chat" and done["result"]["object"] == "chat.completion"
    r = httpx.delete(f"{fleet.url}/v1/jobs/{chat['id']}")
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_job_cancel_frees_blocks(fleet):
    _wait_blocks_free(fleet)
    r = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": PROMPTS[1] * 20, "max_tokens": 1000, "ignore_eos": True,
                                  "temperature": 0})
    job = r.json()
    _wait_job(fleet, job["id"], ("running",))
    assert _used_blocks(fleet) > 0
    r = httpx.delete(f"{fleet.url}/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    _wait_blocks_free(fleet, timeout=5)
    assert httpx.get(f"{fleet.url}/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_client_disconnect_cancels_its_request(fleet):
    _wait_blocks_free(fleet)
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", fleet.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got >= 3:
                    break
        assert _used_blocks(fleet) > 0
    _wait_blocks_free(fleet, timeout=10)
    # a non-streaming client that gives up is cancelled as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fleet.url + "/v1/completions", timeout=1.5,
                   json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True})
    _wait_blocks_free(fleet, timeout=10)


def test_jobs_survive_a_gateway_restart(fleet, llm):
    done = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 6, "temperature": 0}).json()
    done = _wait_job(fleet, done["id"], ("completed",))
    pending = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0,
                                        "stop": ["\n\n\n\n"]}).json()
    fleet.kill("gateway")  # SIGKILL: no goodbye
    fleet.start_gateway()
    fleet.wait_gateway()
    again = httpx.get(f"{fleet.url}/v1/jobs/{done['id']}").json()
    assert again["status"] == "completed" and again["result"] == done["result"]
    finished = _wait_job(fleet, pending["id"], ("completed",))
    want = offline(llm, PROMPTS[0], max_tokens=24, temperature=0, stop=["\n\n\n\n"])[0]
    assert finished["result"]["choices"][0]["text"] == want.text


def test_gateway_replicas_are_interchangeable(fleet, client):
    """A second gateway serves the same fleet: a job accepted by one is read and cancelled through the other."""
    from fleet_harness import free_port

    port = free_port()
    fleet.start_gateway("gateway2", port)
    url2 = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url2 + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "second gateway did not come up"
        time.sleep(0.2)
    try:
        job = _post(fleet, "/v1/jobs", {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1000, "ignore_eos": True})
        job_id = job.json()["id"]
        assert httpx.get(f"{url2}/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
        assert httpx.delete(f"{url2}/v1/jobs/{job_id}").json()["status"] == "cancelled"
        _wait_blocks_free(fleet)
        r = httpx.post(url2 + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4,
                                                       "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["text"] == client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4,
                                                                    temperature=0).choices[0].text
    finally:
        fleet.stop("gateway2")


def test_scheduler_restart_resumes_accepted_requests(fleet, client, llm):
    """SIGKILL the scheduler mid-generation and start a new one: it resumes every accepted request from
    the tokens in its output stream; the clients' responses are those of a run without the crash."""
    _wait_blocks_free(fleet)
    prompts = PROMPTS[:3]
    want = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    with ThreadPoolExecutor(len(prompts)) as ex:
        futs = [ex.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=16, temperature=0,
                          extra_body={"ignore_eos": True}) for p in prompts]
        _wait_tokens(fleet, len(prompts))
        fleet.kill("scheduler")
        fleet.start_scheduler()
        got = [f.result(timeout=180) for f in futs]
    for g, w in zip(got, want):
        assert g.choices[0].text == w.outputs[0].text
    fleet.wait_ready(2)


def test_sigkill_a_worker_mid_generation(fleet, client, llm):
    """Every request completes, and greedy outputs equal a run without the kill."""
    _wait_blocks_free(fleet)
    prompts = PROMPTS[:4]
    want = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    with ThreadPoolExecutor(len(prompts)) as ex:
        futs = [ex.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=16, temperature=0,
                          extra_body={"ignore_eos": True}) for p in prompts]
        _wait_tokens(fleet, len(prompts))  # every request is generating
        lost = fleet.stats()["worker_requests"]
        assert all(len(v) >= 1 for v in lost.values())
        fleet.kill("worker1")
        got = [f.result(timeout=180) for f in futs]
    for g, w in zip(got, want):
        assert g.choices[0].finish_reason == "length"
        assert g.choices[0].text == w.outputs[0].text
    # each request that was running on worker1 resumed elsewhere: a recompute preemption for reason
    # worker_lost on worker1 (the first worker this scheduler process lost)
    metrics = httpx.get(fleet.scheduler_url + "/metrics").text
    lost_n = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("pagedfleet_preemptions_total{") and 'worker="worker1"' in line
              and 'reason="worker_lost"' in line]
    assert lost_n == [len(lost["worker1"])], (lost_n, lost)
    assert [w["worker_id"] for w in fleet.workers()] == ["worker0"]
    assert httpx.get(fleet.url + "/health").json()["workers"] == 1
    # the worker comes back (same id, new incarnation) and serves again
    fleet.start_worker(1)
    fleet.wait_ready(2)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"
