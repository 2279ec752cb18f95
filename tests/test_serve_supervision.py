"""`pagedfleet serve --workers 2` under supervisord: SIGKILL one worker mid-generation and every request
(streaming and not) completes with the greedy output of a run without the kill; supervisord starts the
worker again (a new pid registers); SIGTERM to serve stops every process it started.

All traffic on 127.0.0.1, free ports, the embedded SmolLM2 on the CPU, the state directory in tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fleet_harness import REPO, free_port

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(600)]

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of", "A haiku about the sea:"]
MAX_TOKENS = 32


def _until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.1):
    """Poll `cond` until it returns something truthy (the fleet has no push channel for these states)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode} while waiting for {what}")
        try:
            got = cond()
        except (httpx.HTTPError, OSError):
            got = None
        if got:
            return got
        time.sleep(poll_s)
    raise TimeoutError(what)


class Serve:
    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.port, self.sched_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sched_url = f"http://127.0.0.1:{self.sched_port}"
        self.redis_port = free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO), PAGEDFLEET_HEARTBEAT_INTERVAL_S="0.25",
                   PAGEDFLEET_HEARTBEAT_TTL_S="1.5")
        self.log_path = tmp / "serve.out"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagedfleet.cli", "serve", "--workers", "2", "--host", "127.0.0.1",
                 "--port", str(self.port), "--scheduler-port", str(self.sched_port), "--worker-metrics-port", "0",
                 "--redis-port", str(self.redis_port), "--state-dir", str(self.state), "--no-housekeeping",
                 "--num-gpu-blocks", "512", "--max-model-len", "2048", "--threads-per-worker", "1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen_pids: set[int] = set()

    def rpc(self):
        from pagedfleet.supervision import rpc_proxy

        return rpc_proxy(self.state).supervisor

    def pids(self) -> dict[str, int]:
        """Program name -> pid of every running program (remembered for the orphan check)."""
        out = {p["name"]: p["pid"] for p in self.rpc().getAllProcessInfo() if p["statename"] == "RUNNING"}
        self.seen_pids.update(out.values())
        return out

    def ready(self) -> bool:
        health = httpx.get(self.url + "/health", timeout=2).json()
        workers = httpx.get(self.sched_url + "/v1/workers", timeout=2).json()["workers"]
        return health.get("workers", 0) >= 2 and len(workers) >= 2

    def registered_pid(self, worker: str) -> int | None:
        import redis

        from protocol import streams as S

        r = redis.Redis.from_url(f"redis://127.0.0.1:{self.redis_port}/0", decode_responses=True)
        try:
            raw = r.hget(S.WORKERS, worker)
        finally:
            r.close()
        return S.WorkerRegistration.model_validate_json(raw).pid if raw else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.seen_pids:  # never leave one behind, even when the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path)
    try:
        _until(s.ready, 240, "fleet ready", s.proc, poll_s=0.3)
        yield s
    except BaseException:
        print(s.log_path.read_text()[-8000:], file=sys.stderr)
        raise
    finally:
        s.close()


def _batch(client, on_tokens: threading.Event | None = None) -> list[str]:
    """Half the prompts streamed, half not; greedy, MAX_TOKENS each. `on_tokens` is set once every stream
    has received a few chunks (its request is generating)."""
    streaming = PROMPTS[::2]
    started = threading.Semaphore(0)

    def run(prompt: str) -> str:
        kw = dict(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        if prompt not in streaming:
            resp = client.completions.create(**kw)
            assert resp.choices[0].finish_reason == "length"
            return resp.choices[0].text
        text, n = [], 0
        for chunk in client.completions.create(stream=True, **kw):
            if chunk.choices:
                text.append(chunk.choices[0].text)
                n += 1
                if n == 3:
                    started.release()
        return "".join(text)

    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = [ex.submit(run, p) for p in PROMPTS]
        if on_tokens is not None:
            for _ in streaming:
                assert started.acquire(timeout=120), "streams did not start"
            on_tokens.set()
        return [f.result(timeout=300) for f in futs]


def test_worker_sigkill_under_serve_loses_nothing_and_is_restarted(serve):
    import openai

    client = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    want = _batch(client)  # the no-fault run
    before = serve.pids()
    assert {"redis", "scheduler", "worker0", "worker1", "gateway"} <= set(before)

    generating = threading.Event()
    killed: list[str] = []

    def kill_a_busy_worker():
        assert generating.wait(180)
        busy = _until(lambda: [w for w, reqs in httpx.get(serve.sched_url + "/stats", timeout=5)
                               .json()["worker_requests"].items() if reqs], 30, "a worker with requests")
        killed.append(sorted(busy)[0])
        os.kill(before[killed[0]], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    got = _batch(client, on_tokens=generating)
    killer.join(10)
    assert killed, "no worker was killed"
    assert got == want
    out = serve.log_path.read_text()
    assert f"exited: {killed[0]} (terminated by SIGKILL; not expected)" in out  # supervisord saw it die
    assert f"\n{killed[0]}   | " in out  # and the children's logs reach the console, prefixed

    # supervisord started it again, and the new process registered with the scheduler
    name = killed[0]
    new_pid = _until(lambda: (p := serve.pids().get(name)) != before[name] and p, 120, "restart", serve.proc)
    _until(lambda: serve.registered_pid(name) == new_pid, 120, "new pid registers", serve.proc)
    _until(serve.ready, 120, "fleet ready again", serve.proc)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"

    children = set(serve.pids().values()) | set(before.values())
    supervisord = int((serve.state / "supervisord.pid").read_text())
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(90) == 0
    left = [pid for pid in children | {supervisord} if _alive(pid)]
    assert not left, f"left running: {left}"
