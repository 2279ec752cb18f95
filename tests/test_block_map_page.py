"""The live block map (GET /dashboard) in headless Chromium, drawing a real Scheduler.

The app serves the scheduler side (``make_scheduler_http_router``: GET /block-map from
``build_block_map({"w0": scheduler})``) and the gateway side (``gateway.block_map``: the page and the
/v1/block-map proxy, pointed at this same server). A fake worker inside the test answers the scheduler's
plans; the scheduler itself, its ledger and block map are the product's. Saves
test-artifacts/block_map.png.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from protocol import GenerationRequest, SamplingParams, SequenceOutput, StepResult, WorkerInfo

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STATES = ("free", "used", "cached", "shared", "swapped")
NUM_GPU_BLOCKS, NUM_CPU_BLOCKS = 48, 32


class FakeWorker:
    """Answers a StepPlan as a worker would: one token per sampled sequence (fork children too)."""

    def __init__(self):
        self.n = 0

    def execute(self, plan) -> StepResult:
        outs = []
        for s in plan.scheduled:
            if s.sample:
                self.n += 1
                outs.append(SequenceOutput(seq_id=s.seq_id, token_id=10 + self.n % 50, logprob=-0.5))
                for f in s.fork_children:
                    outs.append(SequenceOutput(seq_id=f.child_seq_id, token_id=11 + self.n % 50, logprob=-0.7))
        return StepResult(step_id=plan.step_id, outputs=outs, execute_ms=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_states(bm: dict) -> list[str]:
    (w,) = bm["workers"]
    return [b["state"] for b in w["gpu"]]


def cpu_states(bm: dict) -> list[str]:
    (w,) = bm["workers"]
    return [b["state"] for b in w["cpu"]]


@pytest.fixture
def served_scheduler():
    from gateway.block_map import make_block_map_router
    from scheduler.server.metrics_http import build_block_map, make_scheduler_http_router
    from scheduler.scheduler import Scheduler, SchedulerConfig

    info = WorkerInfo(worker_id="w0", model="test-model", block_size=4, num_gpu_blocks=NUM_GPU_BLOCKS,
                      num_cpu_blocks=NUM_CPU_BLOCKS, max_model_len=256, vocab_size=100, kv_block_bytes=1024)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="swap"), info)
    lock = threading.Lock()

    def block_map() -> dict:
        with lock:
            return build_block_map({"w0": sched})

    port = free_port()
    app = FastAPI()
    app.include_router(make_scheduler_http_router(registry=CollectorRegistry(), block_map=block_map))
    app.include_router(make_block_map_router(scheduler_url=f"http://127.0.0.1:{port}"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", sched, lock, block_map
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run `make system-deps` (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 640})
            yield pg
        finally:
            browser.close()


PAGE_STATES_JS = """(pool) => Array.from(document.querySelectorAll(
    `.worker[data-worker="w0"] .grid[data-pool="${pool}"] .blk`)).map(c => c.dataset.state)"""


def test_block_map_page_draws_the_scheduler_live(served_scheduler, page):
    url, sched, lock, block_map = served_scheduler
    page.goto(url + "/dashboard")

    # 1. idle: the grid has exactly the blocks the scheduler reports, all free
    page.wait_for_function(
        f"document.querySelectorAll('.worker[data-worker=\"w0\"] .grid[data-pool=\"gpu\"] .blk').length === "
        f"{NUM_GPU_BLOCKS}", timeout=15_000)
    assert page.evaluate(PAGE_STATES_JS, "gpu") == gpu_states(block_map()) == ["free"] * NUM_GPU_BLOCKS
    assert len(page.evaluate(PAGE_STATES_JS, "cpu")) == NUM_CPU_BLOCKS
    assert "test-model" in page.inner_text(".worker h2")
    legend = page.inner_text("#legend")
    for state in STATES:
        assert state in legend

    # 2. requests run: a finished prompt (its blocks stay cached), a parallel-sampling request (n=3 shares
    #    its prompt blocks), long decodes that exhaust the pool and get swapped out to the CPU
    def add(rid, prompt, **kw):
        sched.add_request(GenerationRequest(request_id=rid, prompt_token_ids=prompt,
                                            sampling=SamplingParams(ignore_eos=True, **kw)))

    with lock:
        add("warm", list(range(60, 76)), max_tokens=1)
        add("par", list(range(1, 11)), n=3, max_tokens=80, temperature=0.8, seed=1)
        for i in range(4):
            add(f"long{i}", [20 + i] * 14, max_tokens=30)

    worker = FakeWorker()
    done = threading.Event()
    errors: list[BaseException] = []

    def drive():
        try:
            for _ in range(200):
                with lock:
                    sched.update(worker.execute(sched.schedule()))
                bm = block_map()
                # every colour on screen at once (GPU: free, used, cached, shared; CPU: swapped): stop here
                if set(gpu_states(bm)) >= {"free", "used", "cached", "shared"} and "swapped" in cpu_states(bm):
                    return
                time.sleep(0.12)
            raise AssertionError("the workload never showed every block state at once")
        except BaseException as e:  # reported by the test thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    snapshots = []
    while not done.is_set():
        counts = collections.Counter(page.evaluate(PAGE_STATES_JS, "gpu"))
        counts.update(s for s in page.evaluate(PAGE_STATES_JS, "cpu") if s == "swapped")
        snapshots.append(tuple(sorted(counts.items())))
        page.wait_for_timeout(150)
    t.join(5)
    assert not errors, errors[0]

    # 3. frozen: the page converges to the scheduler's exact block states
    want_gpu, want_cpu = gpu_states(block_map()), cpu_states(block_map())
    deadline = time.monotonic() + 10
    while (page.evaluate(PAGE_STATES_JS, "gpu"), page.evaluate(PAGE_STATES_JS, "cpu")) != (want_gpu, want_cpu):
        assert time.monotonic() < deadline, "the page did not converge to the scheduler's block map"
        page.wait_for_timeout(100)
    assert len(want_gpu) == NUM_GPU_BLOCKS and set(want_gpu) >= {"free", "used", "cached", "shared"}
    assert "swapped" in want_cpu

    # colours changed while the requests ran, and every state has its own colour
    assert len(set(snapshots)) >= 3, snapshots
    colors = {}
    for state in STATES:
        pool = "cpu" if state == "swapped" else "gpu"
        cell = page.locator(f'.grid[data-pool="{pool}"] .blk[data-state="{state}"]').first
        colors[state] = cell.evaluate("c => getComputedStyle(c).backgroundColor")
    assert len(set(colors.values())) == len(STATES), colors
    stats = page.inner_text(".worker .stats")
    assert f"blocks {NUM_GPU_BLOCKS}" in stats

    # 4. hovering a shared block names the sequences and requests holding it and its ref count
    (w,) = block_map()["workers"]
    shared = next(b for b in w["gpu"] if b["state"] == "shared")
    cell = page.locator(f'.grid[data-pool="gpu"] .blk[data-id="{shared["id"]}"]')
    cell.hover()
    page.wait_for_selector("#tip", state="visible", timeout=5_000)
    tip = page.inner_text("#tip")
    assert f"ref count: {shared['ref_cnt']}" in tip and shared["ref_cnt"] > 1
    assert f"block {shared['id']}" in tip
    for rid in shared["request_ids"]:
        assert rid in tip
    for sid in shared["seq_ids"]:
        assert f"seq {sid}" in tip

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "block_map.png"), full_page=True)
    assert (ARTIFACTS / "block_map.png").stat().st_size > 10_000


def test_block_map_proxy_reports_an_unreachable_scheduler():
    from fastapi.testclient import TestClient

    from gateway.block_map import make_block_map_router

    app = FastAPI()
    app.include_router(make_block_map_router(scheduler_url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0))
    client = TestClient(app)
    r = client.get("/v1/block-map")
    assert r.status_code == 502 and r.json()["workers"] == [] and "scheduler block map" in r.json()["error"]
    page = client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/block-map" in page.text  # the page polls the proxy


def test_block_map_proxy_uses_the_gateway_settings(monkeypatch):
    """The proxy asks GatewaySettings.scheduler_url (set directly, or from PAGEDFLEET_SCHEDULER_URL)."""
    from fastapi.testclient import TestClient

    from gateway.block_map import make_block_map_router
    from gateway.settings import GatewaySettings

    for how in ("field", "env"):
        url = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("PAGEDFLEET_SCHEDULER_URL", url if how == "env" else "http://127.0.0.1:1")
        settings = GatewaySettings(scheduler_url=url) if how == "field" else GatewaySettings()
        assert settings.scheduler_url == url
        app = FastAPI()
        app.state.settings = settings
        app.include_router(make_block_map_router(timeout_s=1.0))
        r = TestClient(app).get("/v1/block-map")
        assert r.status_code == 502 and f"{url}/block-map" in r.json()["error"], (how, r.json())
