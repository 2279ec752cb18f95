"""Gateway-side Prometheus metrics: request latencies, token counters, finished requests by reason.

No torch here. Names are ``pagedfleet_request_*`` / ``pagedfleet_*_tokens_total`` with a ``model`` label.

How gateway/app.py uses it (one ``GatewayMetrics`` per process; ``gateway_metrics()`` is the default)::

    m = gateway_metrics()
    app.include_router(m.router())                           # GET /metrics
    t = m.start_request(model, num_prompt_tokens)            # when the request is accepted
    for delta in deltas:                                     # each RequestOutputDelta from the scheduler
        t.on_delta(delta)                                    # TTFT, inter-token latency, tokens, cached tokens
    t.finish(reason)                                         # "stop" | "length" | "abort" | "error"
                                                             # (finish() is idempotent; on_delta of a finished
                                                             #  delta calls it with the first finish_reason)
"""

from __future__ import annotations

import functools
import glob
import os
import tempfile
import threading
import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from protocol import RequestOutputDelta

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)
TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FINISH_REASONS = ("stop", "length", "abort", "error")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        m = ("model",)
        self.ttft = Histogram("pagedfleet_request_ttft_seconds", "Time to first token.", m, buckets=TTFT_BUCKETS,
                              registry=reg)
        self.itl = Histogram("pagedfleet_request_inter_token_seconds", "Time between output tokens.", m,
                             buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("pagedfleet_request_e2e_seconds", "Request latency, arrival to finish.", m,
                             buckets=E2E_BUCKETS, registry=reg)
        self.prompt_len = Histogram("pagedfleet_request_prompt_tokens", "Prompt tokens per request.", m,
                                    buckets=TOKENS_BUCKETS, registry=reg)
        self.gen_len = Histogram("pagedfleet_request_generation_tokens", "Generated tokens per request.", m,
                                 buckets=TOKENS_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("pagedfleet_prompt_tokens", "Prompt tokens of accepted requests.", m,
                                     registry=reg)
        self.generation_tokens = Counter("pagedfleet_generation_tokens", "Tokens generated.", m, registry=reg)
        self.cached_tokens = Counter("pagedfleet_request_cached_tokens",
                                     "Prompt tokens served from the prefix cache, as reported to requests.", m,
                                     registry=reg)
        self.received = Counter("pagedfleet_requests_received", "Requests accepted.", m, registry=reg)
        self.finished = Counter("pagedfleet_requests_finished", "Requests finished, by reason.", m + ("reason",),
                                registry=reg)
        # livesum: with several gateway processes, the sum over the live ones (a dead one's requests ended)
        self.in_flight = Gauge("pagedfleet_requests_in_flight", "Requests accepted and not yet finished.", m,
                               registry=reg, multiprocess_mode="livesum")

    def ensure_model(self, model: str) -> None:
        """Create the zero series of a model, so dashboards show 0 rather than no data."""
        for h in (self.ttft, self.itl, self.e2e, self.prompt_len, self.gen_len):
            h.labels(model)
        for c in (self.prompt_tokens, self.generation_tokens, self.cached_tokens, self.received):
            c.labels(model)
        for r in FINISH_REASONS:
            self.finished.labels(model, r)
        self.in_flight.labels(model)

    # raw observations, for callers that time things themselves
    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(max(0.0, seconds))

    def observe_inter_token(self, model: str, seconds: float, n: int = 1) -> None:
        for _ in range(n):
            self.itl.labels(model).observe(max(0.0, seconds))

    def observe_e2e(self, model: str, seconds: float) -> None:
        self.e2e.labels(model).observe(max(0.0, seconds))

    def inc_prompt_tokens(self, model: str, n: int) -> None:
        self.prompt_tokens.labels(model).inc(n)

    def inc_generation_tokens(self, model: str, n: int) -> None:
        self.generation_tokens.labels(model).inc(n)

    def inc_finished(self, model: str, reason: str) -> None:
        self.finished.labels(model, str(getattr(reason, "value", reason))).inc()

    def start_request(self, model: str, num_prompt_tokens: int, arrival_time: float | None = None) -> RequestTracker:
        return RequestTracker(self, model, num_prompt_tokens, arrival_time)

    def router(self):
        """A FastAPI APIRouter serving GET /metrics from this registry."""
        from fastapi import APIRouter, Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        r = APIRouter()
        reg = self.registry

        @r.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            if reg is REGISTRY and multiprocess_dir():  # every gateway process's values, added up
                both = CollectorRegistry()
                multiprocess.MultiProcessCollector(both)
                return Response(generate_latest(both), media_type=CONTENT_TYPE_LATEST)
            return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

        return r


class RequestTracker:
    """Times one request: TTFT on the first generated token, inter-token latency after, e2e at finish.

    With n > 1 completions, tokens of all completions count; TTFT is the first token of any of them.
    ``time.monotonic`` is the clock; ``arrival_time`` (same clock) defaults to now.
    """

    def __init__(self, metrics: GatewayMetrics, model: str, num_prompt_tokens: int,
                 arrival_time: float | None = None):
        self.m = metrics
        self.model = model
        self.arrival = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self._last: dict[int, float] = {}
        self.num_generated = 0
        self.finished_reason: str | None = None
        self._lock = threading.Lock()
        metrics.received.labels(model).inc()
        metrics.in_flight.labels(model).inc()
        metrics.prompt_tokens.labels(model).inc(num_prompt_tokens)
        metrics.prompt_len.labels(model).observe(num_prompt_tokens)
        self._cached_seen = 0
        # the per-delta series, looked up once (labels() takes a lock and a dict lookup per call)
        self._itl = metrics.itl.labels(model)
        self._generated = metrics.generation_tokens.labels(model)

    def on_tokens(self, n: int, now: float | None = None, index: int = 0) -> None:
        """``n`` new tokens of completion ``index`` arrived at ``now``."""
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.first_token_time is None:
                self.first_token_time = now
                self.m.ttft.labels(self.model).observe(max(0.0, now - self.arrival))
            last = self._last.get(index)
            if last is not None:  # tokens that came together share the gap
                gap = max(0.0, now - last) / n
                for _ in range(n):
                    self._itl.observe(gap)
            self._last[index] = now
            self.num_generated += n
        self._generated.inc(n)

    def on_delta(self, delta: Any, now: float | None = None) -> None:
        """Account a protocol.RequestOutputDelta (or an equivalent dict)."""
        if isinstance(delta, dict):  # read as attributes below: no per-delta conversion on the hot path
            delta = RequestOutputDelta.model_validate(delta)
        now = time.monotonic() if now is None else now
        outputs = delta.outputs or []
        for o in outputs:
            self.on_tokens(len(o.token_ids), now, o.index)
        cached = delta.num_cached_tokens or 0
        if cached > self._cached_seen:
            self.m.cached_tokens.labels(self.model).inc(cached - self._cached_seen)
            self._cached_seen = cached
        if delta.finished:
            reasons = [o.finish_reason for o in outputs if o.finish_reason]
            reason = reasons[0] if reasons else ("error" if delta.error else "stop")
            self.finish(reason, now)

    def finish(self, reason: Any, now: float | None = None) -> None:
        with self._lock:
            if self.finished_reason is not None:
                return
            self.finished_reason = str(getattr(reason, "value", reason))
        now = time.monotonic() if now is None else now
        self.m.e2e.labels(self.model).observe(max(0.0, now - self.arrival))
        self.m.gen_len.labels(self.model).observe(self.num_generated)
        self.m.finished.labels(self.model, self.finished_reason).inc()
        self.m.in_flight.labels(self.model).dec()


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory, set by `python -m gateway.app --processes N` (N > 1) before
    the processes start: their metric values live in files there."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def multiprocess_metrics_dir() -> tuple[str, bool]:
    """Before `--processes N` starts them: prometheus-client's multiprocess directory (set in the environment
    they inherit), without an earlier run's values (they would add up), and whether it is ours to remove:
    PROMETHEUS_MULTIPROC_DIR if set (its *.db files removed), else a new temporary one."""
    d = multiprocess_dir()
    ours = d is None
    if ours:
        d = tempfile.mkdtemp(prefix="pagedfleet-gateway-metrics-")
    os.makedirs(d, exist_ok=True)
    for f in glob.glob(os.path.join(d, "*.db")):
        os.remove(f)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
    return d, ours


def metrics_process_gone() -> None:
    """A gateway process's exit: its live gauges (requests in flight) leave the sum of the others."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())


@functools.cache
def gateway_metrics() -> GatewayMetrics:
    """The process-wide GatewayMetrics on the default registry (created once)."""
    return GatewayMetrics()
