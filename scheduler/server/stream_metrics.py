"""The Redis queue's metrics (stream length, lag, pending, reclaimed and dead-lettered entries), polled from
Redis by the scheduler service; and the cumulative totals that advance counters kept by another process."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from protocol import streams as S


class CumulativeTotals:
    """Advances Prometheus counters from totals counted elsewhere (a Scheduler's stats, housekeeping's hash):
    by the difference to the last total seen; a total that goes down means a new counter, counted from 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple, float] = {}

    def advance(self, child, key: tuple, total: float) -> float:
        with self._lock:
            last = self._last.get(key, 0.0)
            delta = total - last if total >= last else total
            self._last[key] = total
        if delta > 0:
            child.inc(delta)
        return delta

    def forget(self, owner: str) -> None:
        """Drop the totals whose key starts with ``owner`` (a worker that left)."""
        with self._lock:
            for key in [k for k in self._last if k[0] == owner]:
                del self._last[key]


class StreamMetrics:
    def __init__(self, reg: CollectorRegistry, totals: CumulativeTotals):
        self.totals = totals
        self.length = Gauge("pagedfleet_stream_length", "Entries in a Redis stream.", ("stream",), registry=reg)
        self.lag = Gauge("pagedfleet_stream_lag", "Entries of a stream not yet delivered to a consumer group.",
                         ("stream", "group"), registry=reg)
        self.pending = Gauge("pagedfleet_stream_pending", "Entries delivered to a consumer group but not acknowledged.",
                             ("stream", "group"), registry=reg)
        self.reclaimed = Counter("pagedfleet_stream_reclaimed",
                                 "Pending entries reclaimed from a dead consumer (XAUTOCLAIM).", ("stream", "group"),
                                 registry=reg)
        self.dead_lettered = Counter("pagedfleet_stream_dead_lettered", "Entries moved to the dead-letter stream.",
                                     ("stream",), registry=reg)

    def update_queue_totals(self, stream: str, group: str | None = None, reclaimed_total: float | None = None,
                            dead_lettered_total: float | None = None) -> None:
        """Counts kept by another process (celery housekeeping writes totals to Redis): pass the totals."""
        if reclaimed_total is not None and group is not None:
            self.totals.advance(self.reclaimed.labels(stream, group), ("", "reclaimed", stream, group),
                          reclaimed_total)
        if dead_lettered_total is not None:
            self.totals.advance(self.dead_lettered.labels(stream), ("", "dead", stream), dead_lettered_total)

    def _poll_housekeeping_totals(self, redis_client: Any, key: str) -> None:
        try:
            raw = redis_client.hgetall(key or S.HOUSEKEEPING_STATS) or {}
        except Exception:
            return
        for field, value in raw.items():
            field = field.decode() if isinstance(field, bytes) else str(field)
            try:
                total = float(value)
            except (TypeError, ValueError):
                continue
            kind, _, rest = field.partition(":")
            if kind == "dead" and rest:
                self.update_queue_totals(rest, dead_lettered_total=total)
            elif kind == "reclaimed" and rest:
                stream, _, group = rest.rpartition(":")
                if stream:
                    self.update_queue_totals(stream, group, reclaimed_total=total)

    def poll(self, redis_client: Any, streams: Mapping[str, str | Iterable[str] | None],
             housekeeping_stats_key: str | None = "") -> None:
        """XLEN / XINFO GROUPS every stream; ``streams`` maps a stream to its consumer group(s) (or None).

        Lag is XINFO's ``lag`` (Redis >= 7), else counted with XRANGE after the group's last delivered id.
        Reclaimed / dead-lettered totals that Celery housekeeping keeps in the Redis hash
        ``housekeeping_stats_key`` (fields ``reclaimed:{stream}:{group}`` and ``dead:{stream}``; "" means
        housekeeping's ``pf:housekeeping:stats``, None skips it) advance the counters too.
        """
        if housekeeping_stats_key is not None:
            self._poll_housekeeping_totals(redis_client, housekeeping_stats_key)
        for stream, groups in streams.items():
            try:
                length = int(redis_client.xlen(stream))
            except Exception:  # the stream does not exist yet
                length = 0
            self.length.labels(stream).set(length)
            self.dead_lettered.labels(stream)
            try:
                infos = redis_client.xinfo_groups(stream) if length or groups else []
            except Exception:
                infos = []
            wanted = None if groups is None else ({groups} if isinstance(groups, str) else set(groups))
            for info in infos:
                info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
                name = info.get("name")
                name = name.decode() if isinstance(name, bytes) else str(name)
                if wanted is not None and name not in wanted:
                    continue
                lag = info.get("lag")
                if lag is None:
                    last = info.get("last-delivered-id", "0-0")
                    last = last.decode() if isinstance(last, bytes) else str(last)
                    try:
                        lag = len(redis_client.xrange(stream, "(" + last, "+", count=100_000))
                    except Exception:
                        lag = 0
                self.lag.labels(stream, name).set(int(lag))
                self.reclaimed.labels(stream, name)
                self.pending.labels(stream, name).set(int(info.get("pending", 0) or 0))


