"""The scheduler service's HTTP port: /metrics, /sd, /block-map, /block-map/{worker}, /v1/workers,
/stats, /health."""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from scheduler.server.metrics_http import make_scheduler_http_router
from scheduler.server.state import ServiceState


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Enum):
        return x.value
    return str(x)


def workers_json(state: ServiceState) -> list[dict]:
    return [{"worker_id": wid, "model": h.reg.info.model, "metrics_address": h.reg.metrics_url,
             "incarnation": h.reg.incarnation, "draining": h.reg.draining, "info": h.reg.info.model_dump(),
             "requests": len(h.requests), "steps": h.steps, "stats": _jsonable(h.sched.stats())}
            for wid, h in state.workers.items()]


def block_map(state: ServiceState) -> dict:
    workers = []
    for wid, h in state.workers.items():
        entry = dict(h.sched.block_map())
        entry.setdefault("worker_id", wid)
        entry.setdefault("model", h.reg.info.model)
        entry.setdefault("tensor_parallel_size", h.reg.info.tensor_parallel_size)  # a TP group is one worker
        workers.append(_jsonable(entry))
    return {"workers": workers}


def build_http_app(state: ServiceState) -> FastAPI:
    app = FastAPI(title="PagedFleet scheduler")
    app.include_router(make_scheduler_http_router(workers=lambda: workers_json(state),
                                                  block_map=lambda: block_map(state)))

    @app.get("/v1/workers")
    def workers() -> dict:
        return {"workers": workers_json(state)}

    @app.get("/block-map/{worker_id}")
    def block_map_one(worker_id: str):
        for w in block_map(state)["workers"]:
            if w.get("worker_id") == worker_id:
                return w
        return JSONResponse({"error": f"no live worker {worker_id!r}"}, status_code=404)

    @app.get("/stats")
    def stats() -> dict:
        return {"workers": {wid: _jsonable(h.sched.stats()) for wid, h in state.workers.items()},
                "config": state.settings.scheduler_config().model_dump(),  # the policy every worker runs
                "requests": len(state.requests), "orphans": len(state.orphans),
                "request_ids": sorted(state.requests)[:100],
                "worker_requests": {wid: sorted(h.requests)[:100] for wid, h in state.workers.items()}}

    @app.get("/health")
    def health():
        ok = bool(state.workers)
        return JSONResponse({"status": "ok" if ok else "no workers", "workers": len(state.workers)},
                            status_code=200 if ok else 503)

    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the service handles signals itself
        yield


async def serve_http(state: ServiceState) -> None:
    """Serve until the service stops."""
    s = state.settings
    server = _Server(uvicorn.Config(build_http_app(state), host=s.scheduler_host, port=s.scheduler_port,
                                    log_level="warning", lifespan="off",
                                    log_config=None, access_log=False))  # logging: protocol/logs.py
    task = asyncio.create_task(server.serve())
    await state.stopping.wait()
    server.should_exit = True
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, timeout=3)
