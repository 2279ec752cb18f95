"""Chaos: a fleet of two CPU workers under a steady load of streaming completions and jobs (greedy, short)
while, one at a time, Redis is SIGKILLed (restarted after 2 s, its append-only file intact), Redis is
stalled (SIGSTOP 5 s), a worker, the scheduler and the gateway are SIGKILLed and restarted.

Afterwards: every job completed with the greedy output of a no-fault run (the same fleet, before the
faults); every stream completed identically, or (gateway kill only) ended with its client; no block is
held; nothing is pending in the requests / results / plan streams. Prints sent / completed / failed / lost
and asserts lost = 0 (and no failure outside the gateway kill)."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from fleet_harness import Fleet, module_fleet
from protocol import streams as S

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are", "A haiku about the sea:", "Once upon a time,"]
MAX_TOKENS = 10
STREAMERS = 3  # concurrent streaming clients
JOB_EVERY_S = 0.7  # a job is submitted this often


@dataclass
class Outcome:
    kind: str  # "stream" | "job"
    prompt: str
    started: float
    ended: float = 0.0
    text: str | None = None
    error: str | None = None


def _refused(e: BaseException | None) -> bool:
    """The connection was refused (the gateway is down): the request never left."""
    while e is not None:
        if isinstance(e, (httpx.ConnectError, ConnectionRefusedError)):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass
class Load:
    """The clients: streaming completions and jobs, until stopped. A connection refused before anything was
    sent (the gateway is down) is not a request: it is tried again."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    jobs: list[tuple[Outcome, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)

    def streamer(self, seed: int) -> None:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=90)
        for prompt in itertools.islice(itertools.cycle(PROMPTS), seed, None):
            if self.stop.is_set():
                return
            o = Outcome("stream", prompt, time.monotonic())
            try:
                chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                   stream=True)
                o.text = "".join(c.choices[0].text for c in chunks if c.choices)
            except openai.APIConnectionError as e:
                if _refused(e):  # nothing was sent
                    self.stop.wait(0.2)
                    continue
                o.error = f"{type(e).__name__}: {e.__cause__!r}"
            except openai.APIError as e:
                o.error = f"{type(e).__name__}: {e}"
            o.ended = time.monotonic()
            self._record(o)

    def job_submitter(self) -> None:
        for prompt in itertools.cycle(PROMPTS):
            if self.stop.wait(JOB_EVERY_S):
                return
            o = Outcome("job", prompt, time.monotonic())
            try:
                r = httpx.post(self.url + "/v1/jobs", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                           "temperature": 0}, timeout=30)
            except httpx.ConnectError:
                continue
            except httpx.HTTPError as e:
                o.error = repr(e)
                o.ended = time.monotonic()
                self._record(o)
                continue
            if r.status_code != 202:
                o.error = f"{r.status_code} {r.text[:200]}"
                self._record(o)
                continue
            with self.lock:
                self.jobs.append((o, r.json()["id"]))

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.streamer, args=(i,), daemon=True) for i in range(STREAMERS)]
        threads.append(threading.Thread(target=self.job_submitter, daemon=True))
        for t in threads:
            t.start()
        return threads


def wait_job(url: str, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    j: dict = {}
    while time.monotonic() < deadline:
        try:
            j = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        except httpx.HTTPError:
            time.sleep(0.3)
            continue
        if j.get("status") in ("completed", "failed", "cancelled"):
            return j
        time.sleep(0.3)
    return j


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(what)


def completed_since(load: Load, t: float) -> int:
    with load.lock:
        return sum(1 for o in load.outcomes if o.ended > t and o.text is not None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "chaos", log_lines=40, num_workers=2, num_gpu_blocks=256,
                            max_model_len=512)


def faults(fleet: Fleet) -> list[tuple[str, object]]:
    """One at a time, in this order."""
    def kill_redis():
        fleet.redis.kill()
        time.sleep(2.0)
        fleet.redis.start()

    def stall_redis():
        fleet.redis.pause(signal.SIGSTOP)
        time.sleep(5.0)
        fleet.redis.pause(signal.SIGCONT)

    def restart(name, start):
        def fault():
            fleet.kill(name)
            start()
        return fault

    return [("redis kill", kill_redis), ("redis stall", stall_redis),
            ("worker kill", restart("worker1", lambda: fleet.start_worker(1))),
            ("scheduler kill", restart("scheduler", fleet.start_scheduler)),
            ("gateway kill", restart("gateway", fleet.start_gateway))]


def run_faults(fleet: Fleet, load: Load) -> tuple[float, float]:
    """Each fault while the load runs (some requests complete before it and after it); returns when the
    gateway was down."""
    gateway_down = (0.0, 0.0)
    for name, fault in faults(fleet):
        t = time.monotonic()
        wait_until(lambda: completed_since(load, t) >= 2, 60, f"no load before {name}")
        t_fault = time.monotonic()
        fault()
        fleet.wait_ready(2, timeout=90)
        t_back = time.monotonic()
        if name == "gateway kill":
            gateway_down = (t_fault, t_back)
        wait_until(lambda: completed_since(load, t_back) >= 2, 90, f"no progress after {name}")
        print(f"{name}: recovered in {t_back - t_fault:.1f} s")
    return gateway_down


def collect_jobs(fleet: Fleet, load: Load) -> None:
    for o, job_id in load.jobs:
        j = wait_job(fleet.url, job_id)
        o.ended = time.monotonic()
        if j.get("status") == "completed":
            o.text = j["result"]["choices"][0]["text"]
        else:
            o.error = f"job {job_id} {j.get('status')}: {j.get('error')}"
        load.outcomes.append(o)


def assert_drained(fleet: Fleet) -> None:
    """No request tracked, no block held, nothing pending in the requests / results / plan streams."""
    def drained() -> bool:
        st = fleet.stats()
        return not st["request_ids"] and all(w["gpu_blocks_used"] == 0 for w in st["workers"].values())

    wait_until(drained, 30, f"blocks still held: {fleet.stats()}")
    r = fleet.redis.client()
    streams = [(S.REQUESTS, S.SCHEDULER_GROUP), (S.RESULTS, S.SCHEDULER_GROUP)]
    streams += [(S.plan_stream(w["worker_id"]), S.WORKER_GROUP) for w in fleet.workers()]
    wait_until(lambda: all(r.xpending(k, g)["pending"] == 0 for k, g in streams), 30,
               f"pending entries: {[(k, r.xpending(k, g)['pending']) for k, g in streams]}")


def test_chaos_nothing_lost(fleet):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for p in PROMPTS}  # the no-fault run
    load = Load(fleet.url)
    threads = load.run()
    try:
        gateway_down = run_faults(fleet, load)
    finally:
        load.stop.set()
        for th in threads:
            th.join(120)
    collect_jobs(fleet, load)

    def with_client(o: Outcome) -> bool:
        """A stream or a job submission its gateway's death ended: in flight at the kill, or connecting while
        the gateway was going down or away (its client saw the connection fail, with no answer: a job it may
        have queued has an id the client never got, so the client submits again)."""
        return o.started < gateway_down[1] and o.ended > gateway_down[0] and (
            o.kind == "stream" or "RemoteProtocolError" in (o.error or "") or "ReadError" in (o.error or ""))

    completed = [o for o in load.outcomes if o.error is None and o.text == want[o.prompt]]
    wrong = [o for o in load.outcomes if o.error is None and o.text != want[o.prompt]]
    failed = [o for o in load.outcomes if o.error is not None]
    ended_with_client = [o for o in failed if with_client(o)]
    lost = wrong + [o for o in failed if not with_client(o)]
    print(f"chaos: sent {len(load.outcomes)} ({sum(o.kind == 'job' for o in load.outcomes)} jobs), "
          f"completed {len(completed)}, failed {len(failed)} (ended with their gateway {len(ended_with_client)}), "
          f"lost {len(lost)}")
    for o in lost[:10]:
        print("lost:", o)
    assert not lost
    assert sum(o.kind == "job" for o in completed) >= 10 and sum(o.kind == "stream" for o in completed) >= 20
    assert_drained(fleet)


def test_orphaned_streams_are_aborted_jobs_run_on(fleet):
    """A gateway SIGKILLed mid-stream: its streams' requests are aborted within seconds (their blocks freed,
    through the gateway's lease); a job submitted through it runs on and completes."""
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    job = httpx.post(fleet.url + "/v1/jobs", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40,
                                                  "ignore_eos": True, "temperature": 0}, timeout=30).json()
    first_chunk = threading.Barrier(5)
    ended: list[BaseException | None] = []

    def stream(prompt: str) -> None:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        try:
            for i, _c in enumerate(chunks):
                if i == 0:
                    first_chunk.wait(60)
            ended.append(None)
        except openai.APIError as e:
            ended.append(e)

    threads = [threading.Thread(target=stream, args=(p,), daemon=True) for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    first_chunk.wait(60)
    assert len(fleet.stats()["request_ids"]) >= 4
    fleet.kill("gateway")
    t_kill = time.monotonic()
    for t in threads:
        t.join(30)
    assert len(ended) == 4 and all(e is not None for e in ended)  # every client saw its stream end

    def orphans_gone() -> bool:
        return [rid for rid in fleet.stats()["request_ids"] if not rid.startswith("job-")] == []

    wait_until(orphans_gone, 10, f"orphaned requests still running: {fleet.stats()['request_ids']}")
    freed_s = time.monotonic() - t_kill
    print(f"orphans: aborted {freed_s:.1f} s after the gateway died")
    fleet.start_gateway()
    fleet.wait_gateway()
    done = wait_job(fleet.url, job["id"])
    assert done["status"] == "completed" and done["result"]["usage"]["completion_tokens"] == 40

    assert_drained(fleet)
