"""Observability of a running fleet: a real Prometheus server (the Debian binary) scrapes the gateway, the
scheduler and every worker it finds through the scheduler's /sd endpoint; after a known workload every
PromQL query of every dashboard panel returns series, the numbers agree with the scheduler's ledger, and a
worker started later is discovered and scraped without touching the configuration."""

from __future__ import annotations

import json
import re
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

from fleet_harness import Fleet, _stop

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "monitoring" / "grafana" / "dashboards"
RULES = ROOT / "monitoring" / "prometheus" / "rules"
MODEL = "smollm2-135m-instruct"
NUM_GPU_BLOCKS = 256
BLOCK_SIZE = 16
# ~150 tokens, identical twice: the second request finds its full blocks in the prefix cache
PREFIX_PROMPT = " ".join(f"Item {i}: the paged KV cache stores keys and values in blocks." for i in range(12))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("obs-fleet"), num_workers=1, num_gpu_blocks=NUM_GPU_BLOCKS,
              max_model_len=1024, housekeeping=False)
    yield f
    f.dump_logs(20)
    f.close()


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

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        res = self.query(expr)
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


def scheduler_gauge(fleet: Fleet, name: str, worker: str = "worker0") -> float | None:
    text = httpx.get(fleet.scheduler_url + "/metrics", timeout=5).text
    m = re.search(rf'^{name}\{{[^}}]*worker="{worker}"[^}}]*\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        for p in json.loads(f.read_text())["panels"]:
            for t in p.get("targets", []):
                out.append((f.name, p["title"], t["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboards' variables with "All" selected."""
    return (expr.replace("$__rate_interval", "1m").replace('=~"$model"', '=~".*"').replace('=~"$worker"', '=~".*"'))


@pytest.fixture(scope="module")
def workload(fleet, prometheus):
    """A known workload: a prompt twice (prefix hits), parallel sampling (shared blocks), concurrent
    requests; while a long request decodes, the scheduler's exported waste is compared with its ledger."""
    prometheus.wait_scraped({"pagedfleet-gateway": 1, "pagedfleet-scheduler": 1, "pagedfleet-worker": 1})
    before = worker_stats(fleet)
    first = complete(fleet, PREFIX_PROMPT, max_tokens=2, temperature=0)
    prompt_tokens = first["usage"]["prompt_tokens"]
    complete(fleet, PREFIX_PROMPT, max_tokens=2, temperature=0)
    expected_hits = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE

    waste_matches: list[float] = []
    stop = threading.Event()

    def sample_waste():
        while not stop.is_set():
            exported = scheduler_gauge(fleet, "pagedfleet_kv_waste_tokens")
            ledger = worker_stats(fleet)["kv_waste_tokens"]
            again = scheduler_gauge(fleet, "pagedfleet_kv_waste_tokens")
            if exported == again and exported == ledger and ledger > 0:
                waste_matches.append(ledger)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample_waste, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(complete, fleet, "Write a long story about a lighthouse keeper.", max_tokens=40,
                          ignore_eos=True, temperature=0)]
        futs += [ex.submit(complete, fleet, p, max_tokens=12, temperature=0.7, seed=i)
                 for i, p in enumerate(["The capital of France is", "def fibonacci(n):", "Water boils at"])]
        futs.append(ex.submit(complete, fleet, "A haiku about the sea:", max_tokens=10, n=2, temperature=0.9,
                              seed=3))
        for f in futs:
            f.result()
    stop.set()
    sampler.join(5)
    # the scheduler refreshes the ledger gauges when it goes idle; Prometheus scrapes every second and
    # evaluates the recording rules every 5 s
    time.sleep(8)
    return {"before": before, "expected_hits": expected_hits, "waste_matches": waste_matches}


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
    assert workload["waste_matches"], "the exported waste never matched the ledger's kv_waste_tokens"
    # every value Prometheus recorded is a waste of less than one block per running sequence
    worst = prometheus.scalar('max_over_time(pagedfleet_kv_waste_tokens{worker="worker0"}[5m])')
    assert 0 < worst < 8 * BLOCK_SIZE
    ratio = prometheus.query('pagedfleet_kv_waste_ratio{worker="worker0"} > 1')
    assert ratio == []
    stats = worker_stats(fleet)
    assert prometheus.scalar('pagedfleet_kv_waste_tokens{worker="worker0"}') == stats["kv_waste_tokens"]


def test_prefix_hits_match_the_workload(fleet, prometheus, workload):
    stats = worker_stats(fleet)
    hits = prometheus.scalar('pagedfleet_prefix_cache_hit_tokens_total{worker="worker0"}')
    queried = prometheus.scalar('pagedfleet_prefix_cache_query_tokens_total{worker="worker0"}')
    assert hits == stats["prefix_cache_hit_tokens"] and queried == stats["prefix_cache_query_tokens"]
    assert hits - workload["before"]["prefix_cache_hit_tokens"] >= workload["expected_hits"] >= 128
    assert prometheus.scalar('sum(pagedfleet_request_cached_tokens_total)') >= workload["expected_hits"]
    assert prometheus.scalar("pagedfleet:prefix_cache_hit:fleet_ratio_rate5m") > 0


def test_request_metrics_count_the_workload(prometheus, workload):
    finished = prometheus.scalar("sum(pagedfleet_requests_finished_total)")
    assert finished >= 7
    assert prometheus.scalar('sum(pagedfleet_requests_finished_total{reason="length"})') >= 6
    assert prometheus.scalar("sum(pagedfleet_generation_tokens_total)") >= 40 + 3 * 12 + 2 * 10 + 2 * 2
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
