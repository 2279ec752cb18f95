"""A tensor-parallel worker group in the fleet, next to a one-rank worker: it registers as ONE worker with
its tensor_parallel_size (scheduler registry, block map, the worker's own metrics), serves the same greedy
tokens, and a SIGKILL of one of its non-zero ranks takes the whole group down at once: its requests
complete on the other worker with unchanged output.

SmolLM2 (9 query heads, 3 KV heads) splits over 3 ranks, not 2: the group here has 3 (the 2-rank group is
checked offline on a random shape, tests/test_tensor_parallel.py)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fleet_harness import Fleet
from protocol import RequestOutputDelta, SamplingParams
from protocol import streams as S

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
TP = 3
PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Water boils at a temperature of"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet-tp"), num_workers=1, num_gpu_blocks=256, max_model_len=512)
    try:
        f.start_worker(1, ["--tensor-parallel-size", str(TP)])
        f.wait_ready(2)
    except BaseException:
        f.dump_logs()
        f.close()
        raise
    yield f
    f.dump_logs(30)
    f.close()


def _rank_pids(pid: int) -> list[int]:
    """The spawned ranks of the worker process ``pid`` (its children running multiprocessing's spawn_main;
    not its resource tracker)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    ranks = []
    for c in kids:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            ranks.append(c)
    return sorted(ranks)


def _wait_generating(fleet, n_streams: int, n_entries: int = 2, timeout: float = 120) -> None:
    r = fleet.redis.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = []
        for k in r.scan_iter("pf:out:cmpl-*"):
            last = r.xrevrange(k, count=1)
            if last and not S.decode(last[0][1], RequestOutputDelta).finished and r.xlen(k) >= n_entries:
                busy.append(k)
        if len(busy) >= n_streams:
            return
        time.sleep(0.05)
    raise TimeoutError("requests did not start generating")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (its parent has not reaped it yet) is gone too
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_tp_group_is_one_worker_and_survives_a_rank_sigkill(fleet):
    import openai
    import torch

    from pagedfleet.llm import LLM

    workers = {w["worker_id"]: w for w in fleet.workers()}
    assert sorted(workers) == ["worker0", "worker1"]  # the group is one worker
    assert workers["worker1"]["info"]["tensor_parallel_size"] == TP
    assert workers["worker0"]["info"]["tensor_parallel_size"] == 1
    blocks = {w["worker_id"]: w for w in httpx.get(fleet.scheduler_url + "/block-map", timeout=10).json()["workers"]}
    assert blocks["worker1"]["tensor_parallel_size"] == TP and blocks["worker0"]["tensor_parallel_size"] == 1
    metrics = httpx.get(f"http://{workers['worker1']['metrics_address']}/metrics", timeout=10).text
    assert any(line.startswith("pagedfleet_worker_info{") and f'tensor_parallel_size="{TP}"' in line
               and 'worker="worker1"' in line for line in metrics.splitlines()), metrics[:2000]
    pid = fleet.procs["worker1"].pid
    ranks = _rank_pids(pid)
    assert len(ranks) == TP - 1, ranks

    torch.set_num_threads(1)
    want = LLM(None, num_gpu_blocks=256, max_model_len=512).generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = [ex.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                          extra_body={"ignore_eos": True}) for p in PROMPTS]
        # output is flowing and the group holds some of the requests (short requests finish at different
        # times, so do not wait for all of them to be generating at once)
        _wait_generating(fleet, 1)
        deadline = time.monotonic() + 60
        while not (lost := fleet.stats()["worker_requests"]).get("worker1") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lost.get("worker1"), lost  # the group is serving some of them
        fleet.stopped.add("worker1")
        os.kill(ranks[0], signal.SIGKILL)  # rank 1: not the one that talks to Redis
        assert fleet.procs["worker1"].wait(30) == 1  # rank 0 noticed, unregistered and exited
        got = [f.result(timeout=300) for f in futs]
    for g, w in zip(got, want):
        assert g.choices[0].finish_reason == "length"
        assert g.choices[0].text == w.outputs[0].text
    deadline = time.monotonic() + 10
    while not all(_gone(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(r) for r in ranks)  # the other rank went down with rank 0
    assert [w["worker_id"] for w in fleet.workers()] == ["worker0"]
    sched_metrics = httpx.get(fleet.scheduler_url + "/metrics", timeout=10).text
    lost_n = [float(line.rsplit(" ", 1)[1]) for line in sched_metrics.splitlines()
              if line.startswith("pagedfleet_preemptions_total{") and 'worker="worker1"' in line
              and 'reason="worker_lost"' in line]
    # every request the group still held at the kill resumed elsewhere (one may have finished just before)
    assert len(lost_n) == 1 and 1 <= lost_n[0] <= len(lost["worker1"]), (lost_n, lost)
