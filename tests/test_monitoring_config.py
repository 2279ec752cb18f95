"""monitoring/: Prometheus config and rules pass promtool (and their unit tests), the committed Grafana JSON
is what monitoring/dashboards/build.py generates, and every query names only metrics that our metrics
modules define (or recording rules)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
PROM = MON / "prometheus"
DASHBOARDS = MON / "grafana" / "dashboards"
DATASOURCE_UID = "pagedfleet-prometheus"
# Series Prometheus makes itself (not exported by any of our services).
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "atan2"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make system-deps` (Debian package prometheus)")
    return path


def load_build():
    spec = importlib.util.spec_from_file_location("pagedfleet_dashboards_build", MON / "dashboards" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- metric names ----------------------------------------------------------------------------------
def exported_series_names() -> set[str]:
    """Every series name our three metrics modules can export (counters with _total, histograms' parts)."""
    from gateway.metrics import GatewayMetrics
    from gpu_worker.metrics import WorkerMetrics
    from scheduler.server.metrics import SchedulerMetrics

    reg = CollectorRegistry()
    SchedulerMetrics(reg)
    GatewayMetrics(reg)
    WorkerMetrics(worker_id="w", model="m", registry=reg)
    names = set()
    for fam in reg.collect():
        n = fam.name
        if fam.type == "counter":
            names |= {n + "_total", n + "_created"}
        elif fam.type == "histogram":
            names |= {n + "_bucket", n + "_count", n + "_sum", n + "_created"}
        else:
            names.add(n)
    return names


def recording_rule_names() -> set[str]:
    names = set()
    for f in (PROM / "rules").glob("*.yml"):
        for group in yaml.safe_load(f.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, numbers left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # ranges / subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", s)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("("):  # a function or aggregation
            continue
        if m.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_name_parser():
    assert metric_names_in('sum by (worker, le) (rate(a_bucket{x="y", z=~"$w"}[$__rate_interval])) / '
                           'clamp_min(b:c:d, 1e-9) > 0.95 and on (worker) up == 0') == {"a_bucket", "b:c:d", "up"}
    assert metric_names_in("histogram_quantile(0.99, sum(rate(m_bucket[5m])) by (le))") == {"m_bucket"}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel, and every template query."""
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f.name, p.get("title", ""), t["expr"]))
        for v in d["templating"]["list"]:
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if v.get("type") == "query" and q:
                m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
                out.append((f.name, f"variable {v['name']}", m.group(1) if m else q))
    return out


# --- promtool ----------------------------------------------------------------------------------------
def test_promtool_check_config():
    r = subprocess.run([promtool(), "check", "config", str(PROM / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert len(files) >= 2
    r = subprocess.run([promtool(), "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    """The alerts fire when they should (worker down, KV > 95% for 5m, preemption storm, lag growing)."""
    tests = sorted(str(p) for p in (PROM / "tests").glob("*.yml"))
    assert tests
    r = subprocess.run([promtool(), "test", "rules", *tests], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_discovers_workers_through_the_scheduler():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    worker = jobs["pagedfleet-worker"]
    assert worker["http_sd_configs"][0]["url"] == "http://scheduler:8001/sd"
    assert worker.get("honor_labels") is True
    assert jobs["pagedfleet-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert jobs["pagedfleet-scheduler"]["static_configs"][0]["targets"] == ["scheduler:8001"]


def test_alert_and_recording_rules_name_only_our_metrics():
    known = exported_series_names() | recording_rule_names() | PROMETHEUS_BUILTINS
    alerts = set()
    for f in (PROM / "rules").glob("*.yml"):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = metric_names_in(rule["expr"]) - known
                assert not unknown, f"{f.name} {rule.get('record') or rule.get('alert')}: unknown {unknown}"
                alerts.add(rule.get("alert"))
    assert {"PagedFleetWorkerDown", "PagedFleetKVCacheNearlyFull", "PagedFleetPreemptionStorm",
            "PagedFleetQueueLagGrowing"} <= alerts


# --- Grafana -------------------------------------------------------------------------------------------
def test_committed_dashboards_are_what_build_py_generates():
    generated = load_build().generate()
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert set(generated) == set(committed), "run: python monitoring/dashboards/build.py"
    for name, text in generated.items():
        assert json.loads(committed[name]) == json.loads(text), f"{name} is stale: run monitoring/dashboards/build.py"


def test_every_panel_query_names_only_metrics_we_export():
    known = exported_series_names() | recording_rule_names()
    queries = dashboard_queries()
    assert len(queries) > 40
    for dash, title, expr in queries:
        names = metric_names_in(expr)
        assert names, f"{dash} / {title}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{dash} / {title}: {sorted(unknown)} not defined by our metrics modules ({expr})"


def test_dashboards_are_complete_and_well_formed():
    uids, total_panels = set(), 0
    for f in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(f.read_text())
        assert d["uid"] and d["uid"] not in uids
        uids.add(d["uid"])
        cells = set()
        panels = [p for p in d["panels"] if p["type"] != "row"]
        total_panels += len(panels)
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{f.name}: panel {p['title']!r} overlaps another"
                    cells.add((x, y))
            if p["type"] in ("row", "text"):
                continue
            assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == DATASOURCE_UID
        titles = " | ".join(p["title"].lower() for p in panels)
        if d["uid"] == "pagedfleet-kv-cache":
            for word in ("utilisation", "waste", "sharing", "prefix", "preemption", "swap", "eviction", "bytes",
                         "transfer time"):
                assert word in titles, f"KV-cache dashboard lacks a {word} panel"
        if d["uid"] == "pagedfleet-overview":
            for word in ("throughput", "first token", "inter-token", "queue", "worker", "stream"):
                assert word in titles, f"fleet overview lacks a {word} panel"
    assert uids == {"pagedfleet-overview", "pagedfleet-kv-cache"}
    assert total_panels > 24  # vLLM's example dashboard has 12


def test_grafana_provisioning_points_at_the_dashboards():
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/pagedfleet.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
