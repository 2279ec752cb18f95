"""Grafana dashboards of PagedFleet, as code (grafanalib).

    python monitoring/dashboards/build.py            # write monitoring/grafana/dashboards/*.json
    python monitoring/dashboards/build.py --check    # exit 1 if the committed JSON differs

Every query names only metrics from scheduler/server/metrics.py, gpu_worker/metrics.py, gateway/metrics.py or
recording rules of monitoring/prometheus/rules/recording.yml (tests/test_monitoring_config.py checks).
The datasource is the provisioned one (uid ``pagedfleet-prometheus``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafanalib.core import (
    Dashboard,
    DashboardLink,
    Heatmap,
    Repeat,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Text,
    Time,
    TimeSeries,
)
from grafanalib._gen import DashboardEncoder

OUT_DIR = Path(__file__).resolve().parents[1] / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "pagedfleet-prometheus"}
SCHEMA_VERSION = 39
BLOCK_MAP_URL = "http://localhost:8000/dashboard"
M = 'model=~"$model"'
W = 'worker=~"$worker"'
MW = f"{M}, {W}"
RI = "$__rate_interval"

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"
STATE_COLORS = {"free": "#2a303d", "used": "#3b82f6", "cached": "#22c55e", "shared": "#f59e0b",
                "swapped": "#d946ef"}


# --- helpers ---------------------------------------------------------------------------------------
def target(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series", instant: bool = False) -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DS, format=fmt, instant=instant,
                  intervalFactor=1)


def targets(*pairs: tuple[str, str]) -> list[Target]:
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(pairs)]


def steps(*pairs: tuple[str, float | None]) -> list[dict]:
    return [{"color": c, "value": v} for c, v in pairs]


def color_override(name: str, color: str) -> dict:
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}


def negative_y(regex: str) -> dict:
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [{"id": "custom.transform", "value": "negative-Y"}]}


def ts(title: str, tgts: list[Target], unit: str = "short", description: str = "", stack: bool = False,
       fill: int = 10, overrides: list | None = None, thresholds: list | None = None, max_=None, min_=None,
       bars: bool = False, legend_calcs: list[str] | None = None, repeat: str | None = None) -> TimeSeries:
    kw = {"thresholds": steps((GREEN, None))}
    if thresholds:
        kw.update(thresholds=thresholds, thresholdsStyleMode="line")
    extra = {"fieldConfig": {"defaults": {}}}
    if max_ is not None:
        extra["fieldConfig"]["defaults"]["max"] = max_
    if min_ is not None:
        extra["fieldConfig"]["defaults"]["min"] = min_
    return TimeSeries(
        title=title, dataSource=DS, targets=tgts, unit=unit, description=description,
        stacking={"mode": "normal", "group": "A"} if stack else {"mode": "none"},
        fillOpacity=(80 if bars else (fill if not stack else 60)), drawStyle="bars" if bars else "line",
        lineWidth=1 if stack else 2, showPoints="never", tooltipMode="multi", tooltipSort="desc",
        legendDisplayMode="table" if legend_calcs else "list", legendPlacement="bottom",
        legendCalcs=legend_calcs or [], overrides=overrides or [], spanNulls=True,
        repeat=Repeat(direction="h", variable=repeat, maxPerRow=2) if repeat else Repeat(),
        maxDataPoints=None, extraJson=extra, **kw,
    )


def stat(title: str, expr: str, unit: str = "short", description: str = "", thresholds: list | None = None,
         legend: str = "", decimals: int | None = None, mappings: list | None = None,
         text_mode: str = "auto", graph: bool = True) -> Stat:
    return Stat(
        title=title, dataSource=DS, targets=[target(expr, legend)], format=unit, description=description,
        thresholds=thresholds or steps((GREEN, None)), reduceCalc="lastNotNull", decimals=decimals,
        graphMode="area" if graph else "none", colorMode="value", textMode=text_mode, mappings=mappings or [],
        noValue="0", color={"mode": "thresholds"},
    )


def quantiles(metric: str, by: str, sel: str, qs=(0.5, 0.9, 0.99), legend_prefix: str = "") -> list[Target]:
    out = []
    for i, q in enumerate(qs):
        expr = f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RI}])))"
        lbl = legend_prefix + " ".join("{{" + b.strip() + "}}" for b in by.split(",")) + f" p{int(q * 100)}"
        out.append(target(expr, lbl.strip(), chr(ord("A") + i)))
    return out


class Grid:
    """Places panels left to right in a 24-column grid, wrapping; rows span the full width."""

    def __init__(self):
        self.panels: list = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(RowPanel(title=title, gridPos={"h": 1, "w": 24, "x": 0, "y": self.y}))
        self.y += 1

    def add(self, panel, w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel.gridPos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = self.row_h = 0


def variables(worker: bool = True) -> Templating:
    v = [Template(name="model", label="model", dataSource=DS, query="label_values(pagedfleet_worker_up, model)",
                  includeAll=True, multi=True, allValue=".*", default="$__all", refresh=2, sort=1)]
    if worker:
        v.append(Template(name="worker", label="worker", dataSource=DS,
                          query=f"label_values(pagedfleet_kv_blocks_capacity{{{M}}}, worker)",
                          includeAll=True, multi=True, allValue=".*", default="$__all", refresh=2, sort=1))
    return Templating(list=v)


def links() -> list:
    return [
        DashboardLink(title="PagedFleet", type="dashboards", tags=["pagedfleet"], asDropdown=False,
                      includeVars=True, keepTime=True),
        DashboardLink(title="Live block map", type="link", uri=BLOCK_MAP_URL, icon="external link",
                      targetBlank=True, tooltip="the gateway's live KV block map (GET /dashboard)"),
    ]


def dashboard(title: str, uid: str, description: str, grid: Grid, worker_var: bool = True) -> Dashboard:
    return Dashboard(
        title=title, uid=uid, description=description, tags=["pagedfleet"], panels=grid.panels,
        templating=variables(worker_var), links=links(), refresh="5s", time=Time("now-30m", "now"),
        schemaVersion=SCHEMA_VERSION, graphTooltip=1, timezone="browser", editable=False,
    ).auto_panel_ids()


# --- the fleet overview --------------------------------------------------------------------------
def fleet_overview() -> Dashboard:
    g = Grid()
    g.row("At a glance")
    g.add(stat("Workers up", "sum(pagedfleet_worker_up)", description="Workers registered and heartbeating.",
               thresholds=steps((RED, None), (GREEN, 1)), decimals=0), 4, 4)
    g.add(stat("Requests in flight", f"sum(pagedfleet_requests_in_flight{{{M}}})",
               description="Accepted by the gateways and not finished."), 4, 4)
    g.add(stat("Generation throughput", f"sum(pagedfleet:generation_tokens:rate1m{{{M}}})", unit="tok/s"), 4, 4)
    g.add(stat("Finished requests", f"sum(pagedfleet:requests_finished:rate1m{{{M}}})", unit="reqps"), 4, 4)
    g.add(stat("KV cache utilisation", "pagedfleet:kv_cache_utilization:fleet_ratio", unit="percentunit",
               description="Used / total GPU blocks over the whole fleet.",
               thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 4, 4)
    g.add(stat("Prefix-cache hit ratio", "pagedfleet:prefix_cache_hit:fleet_ratio_rate5m", unit="percentunit",
               description="Prompt tokens found in the prefix cache / prompt tokens looked up (5 min).",
               thresholds=steps((BLUE, None))), 4, 4)

    g.row("Throughput")
    g.add(ts("Token throughput", targets(
        (f"sum by (model) (pagedfleet:prompt_tokens:rate1m{{{M}}})", "prompt {{model}}"),
        (f"sum by (model) (pagedfleet:generation_tokens:rate1m{{{M}}})", "generation {{model}}"),
    ), unit="tok/s", description="Prompt tokens accepted and tokens generated per second."))
    g.add(ts("Finished requests by reason", targets(
        (f"sum by (reason) (pagedfleet:requests_finished:rate1m{{{M}}})", "{{reason}}"),
    ), unit="reqps", stack=True, overrides=[color_override("stop", GREEN), color_override("length", BLUE),
                                            color_override("abort", ORANGE), color_override("error", RED)]))

    g.row("Latency")
    g.add(ts("Time to first token", quantiles("pagedfleet_request_ttft_seconds", "model", M), unit="s",
             description="Arrival at the gateway to the first generated token."), 8)
    g.add(ts("Inter-token latency", quantiles("pagedfleet_request_inter_token_seconds", "model", M), unit="s",
             description="Gap between consecutive tokens of one completion."), 8)
    g.add(ts("End-to-end latency", quantiles("pagedfleet_request_e2e_seconds", "model", M), unit="s"), 8)
    g.add(ts("Queue time", quantiles("pagedfleet_request_queue_seconds", "worker", MW, qs=(0.5, 0.99)), unit="s",
             description="Arrival at the scheduler to the first step that schedules the request."), 8)
    ttft_heat = Heatmap(
        title="Time to first token (distribution)", dataSource=DS, dataFormat="tsbuckets",
        targets=[target(f"sum by (le) (increase(pagedfleet_request_ttft_seconds_bucket{{{M}}}[{RI}]))",
                        "{{le}}", fmt="heatmap")],
        extraJson={"pluginVersion": "10.4.0", "options": {
            "calculate": False, "cellGap": 1, "yAxis": {"unit": "s", "axisPlacement": "left"},
            "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
            "rowsFrame": {"layout": "auto"}, "tooltip": {"show": True, "yHistogram": True},
            "legend": {"show": True}, "showValue": "never", "filterValues": {"le": 1e-9}}},
    )
    g.add(ttft_heat, 8)
    g.add(ts("Request lengths", [
        *quantiles("pagedfleet_request_prompt_tokens", "model", M, qs=(0.5, 0.99), legend_prefix="prompt "),
        *[target(t.expr, t.legendFormat, chr(ord("C") + i)) for i, t in enumerate(
            quantiles("pagedfleet_request_generation_tokens", "model", M, qs=(0.5, 0.99),
                      legend_prefix="generated "))],
    ], unit="short", description="Prompt and generated tokens per request."), 8)

    g.row("Scheduling")
    g.add(ts("Requests per worker", targets(
        (f"sum by (worker) (pagedfleet_requests_running{{{MW}}})", "running {{worker}}"),
        (f"sum by (worker) (pagedfleet_requests_waiting{{{MW}}})", "waiting {{worker}}"),
        (f"sum by (worker) (pagedfleet_requests_preempted{{{MW}}})", "preempted {{worker}}"),
    ), description="Running, waiting and preempted (swapped out or waiting to recompute)."), 8)
    g.add(ts("Batch per step", targets(
        (f"histogram_quantile(0.5, sum by (worker, le) (rate(pagedfleet_step_batch_size_bucket{{{MW}}}[{RI}])))",
         "sequences p50 {{worker}}"),
        (f"pagedfleet:step_batched_tokens:mean1m{{{MW}}}", "tokens mean {{worker}}"),
    ), description="Sequences and tokens batched in one step (continuous batching)."), 8)
    g.add(ts("Step time by phase", targets(
        (f"sum by (phase) (pagedfleet:step_phase_seconds:mean1m{{{MW}}})", "{{phase}}"),
    ), unit="s", stack=True, description="Mean time of one step: scheduling, plan/result transport over Redis, "
                                         "execution on the worker."), 8)
    g.add(ts("Steps per second", targets((f"pagedfleet:steps:rate1m{{{MW}}}", "{{worker}}")), unit="ops"), 8)
    g.add(ts("Preemptions", targets(
        (f"sum by (worker, mode) (pagedfleet:preemptions:rate1m{{{MW}}})", "{{worker}} {{mode}}"),
    ), unit="ops", bars=True, description="Sequence groups preempted per second (details: KV-cache dashboard)."), 8)
    g.add(ts("KV cache utilisation per worker", targets(
        (f"pagedfleet_kv_cache_utilization_ratio{{{MW}}}", "{{worker}}"),
    ), unit="percentunit", max_=1, min_=0, thresholds=steps((GREEN, None), (RED, 0.95))), 8)

    g.row("Queue (Redis Streams)")
    g.add(ts("Stream length", targets(("pagedfleet_stream_length", "{{stream}}")), unit="short"), 8)
    g.add(ts("Consumer groups: lag and pending", targets(
        ("pagedfleet_stream_lag", "lag {{stream}} / {{group}}"),
        ("pagedfleet_stream_pending", "pending {{stream}} / {{group}}"),
    ), description="Lag: entries not yet delivered to the group. Pending: delivered, not acknowledged."), 8)
    g.add(ts("Reclaimed and dead-lettered", targets(
        (f"sum by (stream) (rate(pagedfleet_stream_reclaimed_total[{RI}]))", "reclaimed {{stream}}"),
        (f"sum by (stream) (rate(pagedfleet_stream_dead_lettered_total[{RI}]))", "dead-lettered {{stream}}"),
    ), unit="ops", description="Entries reclaimed from dead consumers and moved to the dead-letter stream."), 8)

    g.row("Workers")
    g.add(stat("Worker status", f"pagedfleet_worker_up{{{MW}}}", legend="{{worker}}", graph=False,
               text_mode="value_and_name", thresholds=steps((RED, None), (GREEN, 1)),
               mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": RED},
                                                       "1": {"text": "UP", "color": GREEN}}}]), 6)
    g.add(ts("Heartbeat age", targets((f"pagedfleet_worker_heartbeat_age_seconds{{{MW}}}", "{{worker}}")),
             unit="s", thresholds=steps((GREEN, None), (RED, 30))), 6)
    g.add(ts("Device memory", targets(
        (f"pagedfleet_worker_device_memory_used_bytes{{{MW}}}", "used {{worker}}"),
        (f"pagedfleet_worker_device_memory_total_bytes{{{MW}}}", "total {{worker}}"),
    ), unit="bytes"), 6)
    g.add(ts("Execute time (worker)", quantiles("pagedfleet_worker_execute_seconds", "worker", MW, qs=(0.5, 0.99)),
             unit="s"), 6)
    return dashboard("PagedFleet · Fleet overview", "pagedfleet-overview",
                     "Throughput, latency, scheduling, the Redis queue and the workers of a PagedFleet deployment.", g)


# --- the KV cache --------------------------------------------------------------------------------
def kv_cache() -> Dashboard:
    g = Grid()
    g.row("Capacity")
    g.add(stat("Utilisation", f"pagedfleet_kv_cache_utilization_ratio{{{MW}}}", unit="percentunit",
               legend="{{worker}}", text_mode="value_and_name",
               thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95)),
               description="Used / total GPU blocks of each worker."), 8, 8)
    g.add(ts("Utilisation over time", targets((f"pagedfleet_kv_cache_utilization_ratio{{{MW}}}", "{{worker}}")),
             unit="percentunit", max_=1, min_=0, thresholds=steps((GREEN, None), (RED, 0.95))), 16, 8)
    g.add(ts("Block states · $worker", targets(
        ('sum(pagedfleet_kv_blocks_used{pool="gpu", worker=~"$worker"}) '
         '- sum(pagedfleet_kv_blocks_shared{pool="gpu", worker=~"$worker"})', "used"),
        ('sum(pagedfleet_kv_blocks_shared{pool="gpu", worker=~"$worker"})', "shared"),
        ('sum(pagedfleet_kv_blocks_cached{pool="gpu", worker=~"$worker"})', "cached"),
        ('sum(pagedfleet_kv_blocks_free{pool="gpu", worker=~"$worker"}) '
         '- sum(pagedfleet_kv_blocks_cached{pool="gpu", worker=~"$worker"})', "free"),
    ), unit="short", stack=True, repeat="worker",
        overrides=[color_override(s, c) for s, c in STATE_COLORS.items()],
        description="GPU blocks by state, stacked to the pool size: used by one sequence, shared (ref > 1, "
                    "copy-on-write), cached (free but holding a reusable prefix), free. The live block map "
                    "shows the same per block."), 12, 9)
    g.add(ts("KV cache bytes", targets(
        (f"sum by (worker, pool) (pagedfleet_kv_cache_used_bytes{{{MW}}})", "used {{worker}} {{pool}}"),
        (f"sum by (worker, pool) (pagedfleet_kv_cache_capacity_bytes{{{MW}}})", "capacity {{worker}} {{pool}}"),
        (f"sum by (worker, pool) (pagedfleet_worker_kv_cache_bytes{{{MW}}})", "allocated {{worker}} {{pool}}"),
    ), unit="bytes", description="Bytes in used blocks (ledger), pool capacity (ledger) and the KV tensors "
                                 "the worker allocated."), 12, 8)
    g.add(ts("Device memory", targets(
        (f"pagedfleet_worker_device_memory_used_bytes{{{MW}}}", "used {{worker}}"),
        (f"pagedfleet_worker_device_memory_total_bytes{{{MW}}}", "total {{worker}}"),
    ), unit="bytes"), 12, 8)

    g.row("Efficiency: waste, sharing, prefix cache")
    g.add(ts("Internal waste", targets(
        (f"pagedfleet:kv_waste:ratio{{{MW}}}", "{{worker}}"),
        ("pagedfleet:kv_waste:fleet_ratio", "fleet"),
    ), unit="percentunit", min_=0, description="Unfilled token slots in the last block of each sequence / "
                                               "token slots of used blocks. PagedAttention keeps this "
                                               "under one block per sequence."), 8)
    g.add(ts("Waste in tokens", targets(
        (f"pagedfleet_kv_waste_tokens{{{MW}}}", "waste {{worker}}"),
        (f"pagedfleet_kv_used_slots{{{MW}}}", "slots {{worker}}"),
    ), unit="short"), 8)
    g.add(ts("Sharing (copy-on-write)", targets(
        (f"pagedfleet:kv_blocks_shared:ratio{{{MW}}}", "shared / used {{worker}}"),
    ), unit="percentunit", min_=0, description="Blocks with ref > 1 (parallel sampling, beam search, prefix "
                                               "sharing) as a share of used blocks."), 8)
    g.add(ts("Copy-on-write copies", targets((f"pagedfleet:kv_cow_copies:rate1m{{{MW}}}", "{{worker}}")),
             unit="ops", bars=True), 8)
    g.add(ts("Prefix-cache hit ratio", targets(
        (f"pagedfleet:prefix_cache_hit:ratio_rate1m{{{MW}}}", "{{worker}}"),
        ("pagedfleet:prefix_cache_hit:fleet_ratio_rate5m", "fleet (5m)"),
    ), unit="percentunit", min_=0, max_=1), 8)
    g.add(ts("Prefix-cache tokens", targets(
        (f"sum by (worker) (rate(pagedfleet_prefix_cache_query_tokens_total{{{MW}}}[{RI}]))", "queried {{worker}}"),
        (f"sum by (worker) (rate(pagedfleet_prefix_cache_hit_tokens_total{{{MW}}}[{RI}]))", "hit {{worker}}"),
    ), unit="tok/s"), 8)
    g.add(ts("Cached (reusable) blocks", targets(
        (f'sum by (worker) (pagedfleet_kv_blocks_cached{{pool="gpu", {MW}}})', "{{worker}}"),
    ), unit="short", description="Free blocks that still hold a prefix-cache entry: reused on a hit, "
                                 "evicted (LRU) when a free block is needed."), 8)
    g.add(ts("Evictions", targets((f"pagedfleet:kv_evictions:rate1m{{{MW}}}", "{{worker}}")), unit="ops",
             bars=True, description="Cached blocks evicted from the prefix cache per second."), 8)
    g.add(ts("Cached share of the pool", targets((f"pagedfleet:kv_blocks_cached:ratio{{{MW}}}", "{{worker}}")),
             unit="percentunit", min_=0), 8)

    g.row("Pressure: preemption and swap")
    g.add(ts("Preemptions by mode and reason", targets(
        (f"sum by (worker, mode, reason) (rate(pagedfleet_preemptions_total{{{MW}}}[{RI}]))",
         "{{worker}} {{mode}} ({{reason}})"),
    ), unit="ops", bars=True, stack=True, legend_calcs=["sum", "max"]), 8)
    g.add(ts("Preempted and waiting requests", targets(
        (f"sum by (worker) (pagedfleet_requests_preempted{{{MW}}})", "preempted {{worker}}"),
        (f"sum by (worker) (pagedfleet_requests_waiting{{{MW}}})", "waiting {{worker}}"),
    )), 8)
    g.add(ts("Swap traffic", targets(
        (f"pagedfleet:kv_swap_bytes:rate1m{{{MW}}}", "{{direction}} {{worker}}"),
    ), unit="Bps", overrides=[negative_y("^out .*")],
        description="Bytes/s swapped GPU -> CPU (out, drawn below the axis) and CPU -> GPU (in)."), 8)
    g.add(ts("Swapped blocks", targets(
        (f"sum by (worker, direction) (rate(pagedfleet_kv_swap_blocks_total{{{MW}}}[{RI}]))",
         "{{direction}} {{worker}}"),
    ), unit="ops", overrides=[negative_y("^out .*")]), 8)
    g.add(ts("CPU swap space", targets(
        (f"pagedfleet:kv_swap_space_utilization:ratio{{{MW}}}", "{{worker}}"),
    ), unit="percentunit", min_=0, max_=1), 8)
    g.add(ts("Step time by phase", targets(
        (f"sum by (phase) (pagedfleet:step_phase_seconds:mean1m{{{MW}}})", "{{phase}}"),
    ), unit="s", stack=True), 8)

    g.row("KV transfer on the workers")
    g.add(ts("KV transfer time", quantiles("pagedfleet_worker_kv_transfer_seconds", "worker, op", MW,
                                           qs=(0.5, 0.99)), unit="s",
             description="Time of one batched transfer per step: swap_out, swap_in, copy (copy-on-write)."), 8)
    g.add(ts("KV transfer bandwidth", targets(
        (f"pagedfleet:worker_kv_transfer:bytes_per_second{{{MW}}}", "{{op}} {{worker}}"),
    ), unit="Bps", description="Bytes moved / time spent moving them."), 8)
    g.add(ts("KV blocks transferred", targets(
        (f"sum by (worker, op) (rate(pagedfleet_worker_kv_transfer_blocks_total{{{MW}}}[{RI}]))", "{{op}} {{worker}}"),
    ), unit="ops"), 8)
    g.add(Text(title="Where to look next", content=(
        "**Live block map**: every block of every worker, coloured by state, with the sequences holding it: "
        f"[{BLOCK_MAP_URL}]({BLOCK_MAP_URL}).\n\n"
        "Utilisation near 100% with rising preemptions means the pool is oversubscribed: add workers, lower "
        "`max_num_seqs`, or enable FP8 KV cache. High waste means short sequences on large blocks: lower the "
        "block size.")), 24, 3)
    return dashboard("PagedFleet · KV cache", "pagedfleet-kv-cache",
                     "The PagedAttention block ledger: utilisation, waste, sharing, prefix cache, preemption, "
                     "swap and KV transfer, per worker.", g)


DASHBOARDS = {"pagedfleet-overview.json": fleet_overview, "pagedfleet-kv-cache.json": kv_cache}


def render(build) -> str:
    return json.dumps(build().to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"


def generate() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {name: render(build) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    a = p.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = a.out / name
        if a.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python monitoring/dashboards/build.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
