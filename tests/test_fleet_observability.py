"""Observability of a running fleet: a real Prometheus server (the Debian binary) scrapes the gateway, the
scheduler and every worker it finds through the scheduler's /sd endpoint; after a known workload every
PromQL query of every dashboard panel returns series, the numbers agree with the scheduler's ledger and
with what the workload must produce (prefix-cache hits, queue-time observations, swap / copy-on-write
transfers timed on the worker), and a worker started later is discovered and scraped without touching the
configuration.

The pool is small (NUM_GPU_BLOCKS) and the scheduler preempts by swapping, so the swap workload must
swap sequences out to the CPU and back in. The gateway runs as two processes on one port (`--processes 2`):
its /metrics adds up both, so the request counts must still match the workload exactly."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from fleet_harness import Fleet, _stop, module_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "monitoring" / "grafana" / "dashboards"
RULES = ROOT / "monitoring" / "prometheus" / "rules"
MODEL = "smollm2-135m-instruct"
NUM_GPU_BLOCKS = 32
NUM_CPU_BLOCKS = 64
BLOCK_SIZE = 16
# ~150 tokens, identical twice: the second request finds its full blocks in the prefix cache
PREFIX_PROMPT = " ".join(f"Item {i}: the paged KV cache stores keys and values in blocks." for i in range(12))
# Short prompts (less than one block: no prefix hits) that each grow to SWAP_TOKENS + prompt tokens, i.e. 10
# blocks: 4 of them need 40 blocks of the 32, so the scheduler must swap one out and back in later.
SWAP_PROMPTS = ["Tell me about lighthouses.", "Describe a storm at sea.", "Explain how tides work.",
                "Write about a harbour town."]
SWAP_TOKENS = 140


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "obs-fleet", log_lines=20, num_workers=1, num_gpu_blocks=NUM_GPU_BLOCKS,
                            max_model_len=1024, housekeeping=False, scheduler_args=["--preemption-mode", "swap"],
                            worker_args=["--num-cpu-blocks", str(NUM_CPU_BLOCKS)], gateway_args=["--processes", "2"])


class Prometheus:
    def __init__(self, workdir: Path, fleet: Fleet):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: run `make system-deps` (Debian package prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        host = lambda url: url.split("://", 1)[1]  # noqa: E731
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
            "scrape_configs": [
                {"job_name": "pagedfleet-gateway", "static_configs": [{"targets": [host(fleet.url)]}]},
                {"job_name": "pagedfleet-scheduler", "static_configs": [{"targets": [host(fleet.scheduler_url)]}]},
                # the same service discovery as monitoring/prometheus/prometheus.yml, at the test's address
                {"job_name": "pagedfleet-worker", "honor_labels": True,
                 "http_sd_configs": [{"url": fleet.scheduler_url + "/sd", "refresh_interval": "1s"}]},
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("prometheus did not start: " + (workdir / "prometheus.log").read_text())
            time.sleep(0.2)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str, at: float | None = None) -> float:
        res = self.query(expr, at)
        assert len(res) == 1, f"{expr}: {res}"
        return float(res[0]["value"][1])

    def targets(self) -> list[dict]:
        return httpx.get(self.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def wait_scraped(self, jobs: dict[str, int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            up: dict[str, int] = {}
            for t in self.targets():
                if t["health"] == "up":
                    up[t["labels"]["job"]] = up.get(t["labels"]["job"], 0) + 1
            if all(up.get(j, 0) >= n for j, n in jobs.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not up: want {jobs}, have {up}: {self.targets()}")
            time.sleep(0.5)

    def close(self) -> None:
        _stop(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(fleet, tmp_path_factory):
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), fleet)
    yield p
    p.close()


def complete(fleet: Fleet, prompt: str, **body) -> dict:
    r = httpx.post(fleet.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def worker_stats(fleet: Fleet) -> dict:
    (w,) = [w for w in fleet.workers() if w["worker_id"] == "worker0"]
    return w["stats"]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """One /metrics scrape: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for smp in fam.samples:
            out[(smp.name, frozenset(smp.labels.items()))] = smp.value
    return out


def pick(samples: dict, name: str, **labels) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels`` (None if there is none)."""
    want = set(labels.items())
    vals = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(vals) <= 1, (name, labels, vals)
    return vals[0] if vals else None


def scheduler_gauge(fleet: Fleet, name: str, worker: str = "worker0") -> float | None:
    return pick(scrape(fleet.scheduler_url), name, worker=worker)


def wait_exported(fleet: Fleet, name: str, value: float, timeout: float = 15.0, **labels) -> float:
    """Wait until the scheduler exports ``value`` (it refreshes the ledger metrics when it goes idle)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pick(scrape(fleet.scheduler_url), name, worker="worker0", **labels)
        if got == value or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def panel_queries(title: str | None = None) -> list[tuple[str, str, str]]:
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        for p in json.loads(f.read_text())["panels"]:
            if title is not None and p["title"] != title:
                continue
            for t in p.get("targets", []):
                out.append((f.name, p["title"], t["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboards' variables with "All" selected."""
    return (expr.replace("$__rate_interval", "1m").replace('=~"$model"', '=~".*"').replace('=~"$worker"', '=~".*"'))


@pytest.fixture(scope="module")
def workload(fleet, prometheus):
    """A known workload: a prompt twice (prefix hits), parallel sampling (shared blocks, copy-on-write),
    concurrent requests, then more sequences than the pool holds (swap out / swap in); meanwhile the
    scheduler's exported waste is compared with its ledger."""
    prometheus.wait_scraped({"pagedfleet-gateway": 1, "pagedfleet-scheduler": 1, "pagedfleet-worker": 1})
    before = worker_stats(fleet)
    assert before["num_steps"] == 0, "the workload must start on a fresh worker"
    sched0 = scrape(fleet.scheduler_url)
    gw0 = scrape(fleet.url)
    out: dict = {"before": before, "requests": 0}

    # --- prefix cache: the same prompt twice, one after the other
    hits, queries = [], []
    cached_gw = []
    for _ in range(2):
        r = complete(fleet, PREFIX_PROMPT, max_tokens=2, temperature=0)
        out["requests"] += 1
        st = worker_stats(fleet)
        hits.append(wait_exported(fleet, "pagedfleet_prefix_cache_hit_tokens_total", st["prefix_cache_hit_tokens"]))
        queries.append(wait_exported(fleet, "pagedfleet_prefix_cache_query_tokens_total",
                                     st["prefix_cache_query_tokens"]))
        cached_gw.append(pick(scrape(fleet.url), "pagedfleet_request_cached_tokens_total", model=MODEL))
    prompt_tokens = r["usage"]["prompt_tokens"]
    # the rule (KVCacheManager.find_cached_prefix): only full blocks, and never the prompt's last token (the
    # step needs its logits), so at most (prompt_tokens - 1) // BLOCK_SIZE blocks of the first request's
    out["prompt_tokens"] = prompt_tokens
    out["expected_hits"] = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    h0 = pick(sched0, "pagedfleet_prefix_cache_hit_tokens_total", worker="worker0")
    q0 = pick(sched0, "pagedfleet_prefix_cache_query_tokens_total", worker="worker0")
    c0 = pick(gw0, "pagedfleet_request_cached_tokens_total", model=MODEL)
    out["hit_deltas"] = [hits[0] - h0, hits[1] - hits[0]]
    out["query_deltas"] = [queries[0] - q0, queries[1] - queries[0]]
    out["gateway_cached_deltas"] = [cached_gw[0] - c0, cached_gw[1] - cached_gw[0]]

    waste_matches: list[float] = []
    inconsistent: list[str] = []
    stop = threading.Event()

    def sample_waste():
        while not stop.is_set():
            exported = scrape(fleet.scheduler_url)
            ledger = worker_stats(fleet)
            again = scrape(fleet.scheduler_url)
            w = pick(exported, "pagedfleet_kv_waste_tokens", worker="worker0")
            slots = pick(exported, "pagedfleet_kv_used_slots", worker="worker0")
            ratio = pick(exported, "pagedfleet_kv_waste_ratio", worker="worker0")
            used = pick(exported, "pagedfleet_kv_blocks_used", worker="worker0", pool="gpu")
            free = pick(exported, "pagedfleet_kv_blocks_free", worker="worker0", pool="gpu")
            # one scrape is one ledger snapshot: its numbers agree with each other at every moment
            if used + free != NUM_GPU_BLOCKS or slots != used * BLOCK_SIZE or \
                    ratio != pytest.approx(w / slots if slots else 0.0):
                inconsistent.append(f"used {used} free {free} slots {slots} waste {w} ratio {ratio}")
            if w == pick(again, "pagedfleet_kv_waste_tokens", worker="worker0") and \
                    w == ledger["kv_waste_tokens"] > 0 and slots == ledger["kv_slots_allocated"]:
                waste_matches.append(w)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample_waste, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(5) as ex:
        futs = [ex.submit(complete, fleet, "Write a long story about a lighthouse keeper.", max_tokens=40,
                          ignore_eos=True, temperature=0)]
        futs += [ex.submit(complete, fleet, p, max_tokens=12, temperature=0.7, seed=i)
                 for i, p in enumerate(["The capital of France is", "def fibonacci(n):", "Water boils at"])]
        futs.append(ex.submit(complete, fleet, "A haiku about the sea:", max_tokens=10, n=2, temperature=0.9,
                              seed=3))
        for f in futs:
            f.result()
    out["requests"] += len(futs)
    # more than the pool holds: swap out, swap in; and a forked request (copy-on-write) among them, so
    # every KV transfer op happens within the last minute of the panels' rate windows
    with ThreadPoolExecutor(len(SWAP_PROMPTS) + 1) as ex:
        futs = [ex.submit(complete, fleet, p, max_tokens=SWAP_TOKENS, ignore_eos=True, temperature=0)
                for p in SWAP_PROMPTS]
        futs.append(ex.submit(complete, fleet, "A haiku about the wind:", max_tokens=6, n=2, temperature=0.9,
                              seed=5))
        for f in futs:
            f.result()
    out["requests"] += len(futs)
    stop.set()
    sampler.join(5)
    # the scheduler refreshes the ledger gauges when it goes idle; Prometheus scrapes every second and
    # evaluates the recording rules every 5 s
    time.sleep(8)
    out.update(waste_matches=waste_matches, inconsistent=inconsistent, at=time.time(), sched0=sched0)
    return out


def test_every_dashboard_query_returns_series(prometheus, workload):
    missing = []
    for dash, title, expr in panel_queries():
        if not prometheus.query(grafana_to_promql(expr)):
            missing.append(f"{dash} / {title}: {expr}")
    assert not missing, "queries with no series:\n" + "\n".join(missing)


def test_block_counts_add_up(fleet, prometheus, workload):
    stats = worker_stats(fleet)
    sel = '{worker="worker0", pool="gpu"}'
    used = prometheus.scalar(f"pagedfleet_kv_blocks_used{sel}")
    free = prometheus.scalar(f"pagedfleet_kv_blocks_free{sel}")
    total = prometheus.scalar(f"pagedfleet_kv_blocks_capacity{sel}")
    assert used + free == total == NUM_GPU_BLOCKS == stats["num_gpu_blocks"]
    assert used == stats["gpu_blocks_used"] and free == stats["gpu_blocks_available"]
    assert prometheus.scalar(f"pagedfleet_kv_blocks_cached{sel}") == stats["gpu_blocks_cached"] > 0
    # and the fleet-wide recording rule agrees
    assert prometheus.scalar("pagedfleet:kv_cache_utilization:fleet_ratio") == pytest.approx(used / total)
    # the worker's own view: KV tensors of that many blocks
    kv_bytes = prometheus.scalar('pagedfleet_worker_kv_cache_bytes{worker="worker0", pool="gpu"}')
    cap_bytes = prometheus.scalar(f"pagedfleet_kv_cache_capacity_bytes{sel}")
    assert kv_bytes == cap_bytes > 0


def test_waste_matches_the_ledger(fleet, prometheus, workload):
    assert not workload["inconsistent"], workload["inconsistent"][:5]
    assert workload["waste_matches"], "the exported waste never matched the ledger's kv_waste_tokens"
    # every value Prometheus recorded is a waste of less than one block per running sequence
    worst = prometheus.scalar('max_over_time(pagedfleet_kv_waste_tokens{worker="worker0"}[5m])')
    assert 0 < worst < 8 * BLOCK_SIZE
    ratio = prometheus.query('pagedfleet_kv_waste_ratio{worker="worker0"} > 1')
    assert ratio == []
    stats = worker_stats(fleet)
    assert prometheus.scalar('pagedfleet_kv_waste_tokens{worker="worker0"}') == stats["kv_waste_tokens"]


def test_prefix_hits_match_the_workload(fleet, prometheus, workload):
    expected = workload["expected_hits"]
    assert expected >= 128
    # first request: nothing cached yet; second: exactly the full blocks before the last prompt token
    assert workload["hit_deltas"] == [0, expected]
    assert workload["query_deltas"] == [workload["prompt_tokens"]] * 2
    assert workload["gateway_cached_deltas"] == [0, expected]
    # and after everything, Prometheus has the ledger's totals
    stats = worker_stats(fleet)
    hits = prometheus.scalar('pagedfleet_prefix_cache_hit_tokens_total{worker="worker0"}')
    queried = prometheus.scalar('pagedfleet_prefix_cache_query_tokens_total{worker="worker0"}')
    assert hits == stats["prefix_cache_hit_tokens"] and queried == stats["prefix_cache_query_tokens"]
    assert prometheus.scalar('sum(pagedfleet_request_cached_tokens_total)') >= expected
    assert prometheus.scalar("pagedfleet:prefix_cache_hit:fleet_ratio_rate5m") > 0


def test_queue_time_is_observed_once_per_request(fleet, prometheus, workload):
    n0 = pick(workload["sched0"], "pagedfleet_request_queue_seconds_count", worker="worker0")
    count = prometheus.scalar('pagedfleet_request_queue_seconds_count{worker="worker0"}')
    assert count - n0 == workload["requests"]
    # arrival -> first StepPlan is part of arrival -> finish
    total = prometheus.scalar('pagedfleet_request_queue_seconds_sum{worker="worker0"}')
    assert 0 < total <= prometheus.scalar("sum(pagedfleet_request_e2e_seconds_sum)")
    # the overview's queue-time panel draws numbers
    for _dash, _title, expr in panel_queries(title="Queue time"):
        values = [float(r["value"][1]) for r in prometheus.query(grafana_to_promql(expr), workload["at"])]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (expr, values)


def test_kv_transfers_are_timed_on_the_worker(fleet, prometheus, workload):
    """Every block the scheduler ordered swapped or copied was moved, and timed, by the worker; the
    transfer panels draw real numbers."""
    stats = worker_stats(fleet)
    (info,) = [w["info"] for w in fleet.workers() if w["worker_id"] == "worker0"]
    w = '{worker="worker0"}'
    assert prometheus.scalar(f'pagedfleet_preemptions_total{{worker="worker0", mode="swap", reason="out_of_blocks"}}') \
        == stats["preemptions_swap"] > 0
    ledger = {"swap_out": stats["swap_out_blocks"], "swap_in": stats["swap_in_blocks"], "copy": stats["cow_copies"]}
    ordered = {"swap_out": f'pagedfleet_kv_swap_blocks_total{{worker="worker0", direction="out"}}',
               "swap_in": f'pagedfleet_kv_swap_blocks_total{{worker="worker0", direction="in"}}',
               "copy": f"pagedfleet_kv_cow_copies_total{w}"}
    for op, expr in ordered.items():
        sel = f'{{worker="worker0", op="{op}"}}'
        moved = prometheus.scalar(f"pagedfleet_worker_kv_transfer_blocks_total{sel}")
        assert moved == prometheus.scalar(expr) == ledger[op] > 0, op
        assert prometheus.scalar(f"pagedfleet_worker_kv_transfer_bytes_total{sel}") == moved * info["kv_block_bytes"]
        assert prometheus.scalar(f"pagedfleet_worker_kv_transfer_seconds_count{sel}") >= 1
        assert prometheus.scalar(f"pagedfleet_worker_kv_transfer_seconds_sum{sel}") > 0
    # every op shows up with a finite, positive value in the panels (p50 / p99 time, bandwidth)
    for title in ("KV transfer time", "KV transfer bandwidth"):
        for _dash, _title, expr in panel_queries(title=title):
            res = prometheus.query(grafana_to_promql(expr), workload["at"])
            ops = {r["metric"]["op"] for r in res
                   if math.isfinite(float(r["value"][1])) and float(r["value"][1]) > 0}
            assert ops == {"swap_out", "swap_in", "copy"}, (title, expr, res)


def test_request_metrics_count_the_workload(prometheus, workload):
    finished = prometheus.scalar("sum(pagedfleet_requests_finished_total)")
    assert finished == workload["requests"]
    assert prometheus.scalar('sum(pagedfleet_requests_finished_total{reason="length"})') >= 1 + len(SWAP_PROMPTS)
    assert prometheus.scalar("sum(pagedfleet_generation_tokens_total)") >= \
        40 + 3 * 12 + 2 * 10 + 2 * 2 + len(SWAP_PROMPTS) * SWAP_TOKENS
    assert prometheus.scalar("sum(pagedfleet_request_ttft_seconds_count)") == finished
    assert prometheus.scalar("sum(pagedfleet_requests_in_flight)") == 0


def test_a_new_worker_is_discovered_and_scraped(fleet, prometheus, workload):
    fleet.start_worker(1)
    prometheus.wait_scraped({"pagedfleet-worker": 2}, timeout=240)
    workers = {t["labels"].get("worker") for t in prometheus.targets()
               if t["labels"]["job"] == "pagedfleet-worker" and t["health"] == "up"}
    assert workers == {"worker0", "worker1"}
    deadline = time.monotonic() + 30
    while True:
        res = prometheus.query('count by (worker) (pagedfleet_worker_execute_seconds_count{worker="worker1"})')
        up = prometheus.query('pagedfleet_worker_up{worker="worker1"} == 1')
        if res and up:
            break
        assert time.monotonic() < deadline, "worker1's metrics never arrived"
        time.sleep(1)


def gateway_processes(fleet: Fleet) -> list[int]:
    """The pids of the gateway's serving processes (children of `python -m gateway.app --processes 2`, not
    multiprocessing's resource tracker)."""
    parent = fleet.procs["gateway"].pid
    kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    out = []
    for pid in map(int, kids):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except FileNotFoundError:  # gone between the two reads
            pass
    return sorted(out)


def test_a_gateway_process_that_dies_is_started_again(fleet, workload):
    before = gateway_processes(fleet)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    # the other process keeps serving the port meanwhile
    with ThreadPoolExecutor(4) as ex:
        for r in ex.map(lambda i: complete(fleet, f"Say {i}.", max_tokens=4, temperature=0), range(4)):
            assert r["usage"]["completion_tokens"] == 4
    deadline = time.monotonic() + 60
    while True:  # uvicorn's supervisor notices the death and starts a new process
        now = gateway_processes(fleet)
        if len(now) == 2 and before[0] not in now:
            break
        assert time.monotonic() < deadline, f"gateway processes {now} (killed {before[0]})"
        time.sleep(0.2)
    with ThreadPoolExecutor(8) as ex:
        for r in ex.map(lambda i: complete(fleet, f"Count to {i}.", max_tokens=4, temperature=0), range(8)):
            assert r["usage"]["completion_tokens"] == 4
