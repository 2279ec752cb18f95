"""The scheduler service's Prometheus side over HTTP: service discovery of the live workers' /metrics, the
block map, and the router serving them with /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry


def sd_targets(workers: Iterable[Any], default_port: int = 8002) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery JSON for the live workers.

    Each worker is a ``protocol.streams.WorkerRegistration`` (its ``metrics_url`` and ``info``), or a
    mapping / object with ``worker_id``, ``model`` and ``metrics_url`` (``host:port`` of its /metrics;
    ``host`` alone takes ``default_port``). Workers without an address are left out. One target group
    per worker, labelled worker and model, so ``up{job="pagedfleet-worker"}`` names a worker that is down.
    """
    groups = []
    for w in workers:
        if hasattr(w, "model_dump"):
            w = w.model_dump()
        get = w.get if isinstance(w, Mapping) else (lambda k, _w=w: getattr(_w, k, None))
        info = get("info") or {}
        if hasattr(info, "model_dump"):
            info = info.model_dump()
        worker_id = get("worker_id") or info.get("worker_id")
        model = get("model") or info.get("model") or ""
        addr = get("metrics_url") or get("metrics_address")
        if not addr or not worker_id:
            continue
        addr = str(addr).split("://", 1)[-1].rstrip("/").removesuffix("/metrics")
        if ":" not in addr.rsplit("]", 1)[-1]:
            addr = f"{addr}:{default_port}"
        groups.append({"targets": [addr], "labels": {"worker": str(worker_id), "model": str(model)}})
    return groups


def build_block_map(schedulers: Mapping[str, Any]) -> dict[str, Any]:
    """{"workers": [...]} from ``{worker_id: Scheduler}``: each entry is ``Scheduler.block_map()`` (GPU
    blocks under "gpu", CPU swap blocks under "cpu") plus the worker's model and pool sizes."""
    workers = []
    for wid, sched in schedulers.items():
        entry = dict(sched.block_map())
        entry.setdefault("worker_id", wid)
        info = getattr(sched, "worker", None)
        if info is not None:
            entry.setdefault("model", info.model)
            entry.setdefault("num_gpu_blocks", info.num_gpu_blocks)
            entry.setdefault("num_cpu_blocks", info.num_cpu_blocks)
            entry.setdefault("tensor_parallel_size", getattr(info, "tensor_parallel_size", 1))
        workers.append(entry)
    return {"workers": workers}


def make_scheduler_http_router(registry: CollectorRegistry | None = None,
                               workers: Callable[[], Iterable[Any]] | None = None,
                               block_map: Callable[[], Mapping[str, Any]] | None = None):
    """A FastAPI router for the scheduler service's HTTP port (8001): GET /metrics, /sd, /block-map.

    ``workers()`` returns the live worker registry (see ``sd_targets``); ``block_map()`` returns
    ``build_block_map(...)``. Either may be None to leave its endpoint out.
    """
    from fastapi import APIRouter, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    router = APIRouter()
    reg = REGISTRY if registry is None else registry

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    if workers is not None:
        @router.get("/sd")
        def service_discovery() -> list[dict[str, Any]]:
            return sd_targets(workers())

    if block_map is not None:
        @router.get("/block-map")
        def get_block_map() -> Mapping[str, Any]:
            return block_map()

    return router
