"""A worker told to drain (SIGTERM, as Kubernetes scales it down) mid-generation: it takes no new request
(they go to the other worker), finishes the ones it runs (every token arrives, none is resumed elsewhere)
and exits by itself."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from fleet_harness import Fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
LONG = 64


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("drain-fleet"), num_workers=2, num_gpu_blocks=256,
              worker_args=["--drain-timeout", "90"])
    yield f
    f.close()


class Stream(threading.Thread):
    """One streamed completion, read to its end: its id (from the first chunk), text and usage."""

    def __init__(self, client, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.client, self.prompt, self.max_tokens = client, prompt, max_tokens
        self.id, self.text, self.finish, self.usage, self.error = None, "", None, None, None
        self.started = threading.Event()

    def run(self):
        try:
            for chunk in self.client.completions.create(
                    model=MODEL, prompt=self.prompt, max_tokens=self.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                self.id = chunk.id
                self.started.set()
                if chunk.choices:
                    self.text += chunk.choices[0].text
                    self.finish = chunk.choices[0].finish_reason or self.finish
                if chunk.usage:
                    self.usage = chunk.usage
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.started.set()


def worker_of(fleet: Fleet, request_id: str) -> str | None:
    for wid, rids in fleet.stats()["worker_requests"].items():
        if request_id in rids:
            return wid
    return None


def wait_for(what, timeout: float = 30.0, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = what()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(what)


def test_sigterm_drains_running_requests_and_new_ones_go_elsewhere(fleet):
    import openai

    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    running = [Stream(client, f"Story {i}: once upon a time", LONG) for i in range(2)]
    for s in running:
        s.start()
        assert s.started.wait(60) and s.error is None, s.error
    homes = {s.id: wait_for(lambda s=s: worker_of(fleet, s.id)) for s in running}
    draining = homes[running[0].id]
    other = ({"worker0", "worker1"} - {draining}).pop()
    on_draining = [s for s in running if homes[s.id] == draining]

    proc = fleet.procs[draining]
    fleet.stopped.add(draining)  # it is meant to exit
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any(w["worker_id"] == draining and w["draining"] for w in fleet.workers()), timeout=10)
    assert all(s.is_alive() for s in on_draining), "the drained requests were not mid-generation"

    late = Stream(client, "A new request after the drain began", 16)
    late.start()
    assert late.started.wait(60) and late.error is None, late.error
    assert wait_for(lambda: worker_of(fleet, late.id) or late.finish) in (other, "length")
    assert worker_of(fleet, late.id) != draining

    for s in running + [late]:
        s.join(180)
        assert not s.is_alive() and s.error is None, s.error
        assert s.finish == "length" and s.usage.completion_tokens == s.max_tokens, (s.id, s.finish, s.usage)
    assert proc.wait(60) == 0  # it exits by itself once its requests are done
    log = fleet.logs[draining].read_text()
    assert "draining" in log and "drained: no request left" in log and "drain timeout" not in log
    assert "resumed on" not in fleet.logs["scheduler"].read_text()  # nothing was handed back: none recomputed
    # the scheduler sees the registration gone at its next worker check (a periodic pass), not at the exit
    wait_for(lambda: [w["worker_id"] for w in fleet.workers()] == [other], timeout=15)
    assert httpx.get(fleet.url + "/health").json()["workers"] == 1
