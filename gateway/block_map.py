"""The live KV block map: GET /dashboard (one static HTML page) and GET /v1/block-map (JSON).

The page polls /v1/block-map every 500 ms and draws each worker's block pools. /v1/block-map proxies
the scheduler service's ``GET /block-map`` so the page stays same-origin. The scheduler's address is,
in order: the ``scheduler_url`` argument, ``app.state.settings.scheduler_url`` (``GatewaySettings``, which
reads the environment variable ``PAGEDFLEET_SCHEDULER_URL``), then, for an app without settings, that
environment variable, then ``http://127.0.0.1:8001``.

Include it in the gateway app with::

    from gateway.block_map import router as block_map_router
    app.include_router(block_map_router)

or ``make_block_map_router(source=...)`` to draw from an in-process source (a callable returning the
block-map dict, sync or async) instead of the scheduler service.

The JSON shape is the scheduler service's ``{"workers": [Scheduler.block_map() + "model", ...]}``::

    {"workers": [{"worker_id": "w0", "model": "...", "block_size": 16,
                  "gpu": [{"id": 0, "state": "free|used|cached|shared", "ref_cnt": 0, "seq_ids": [3, 4],
                           "request_ids": ["req-1"], "cached": false}, ...],
                  "cpu": [{"id": 0, "state": "free|swapped", "ref_cnt": 1, "seq_ids": [...],
                           "request_ids": [...]}, ...]}]}

(``blocks`` / ``cpu_blocks`` / ``holders`` / ``num_gpu_blocks`` are read too, when a source sends them.)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from gateway.auth import redact_request_ids

PAGE = Path(__file__).parent / "static" / "block_map.html"
DEFAULT_SCHEDULER_URL = "http://127.0.0.1:8001"


def scheduler_url_for(request: Request | None, override: str | None = None) -> str:
    if override:
        return override.rstrip("/")
    settings = getattr(getattr(request, "app", None), "state", None)
    settings = getattr(settings, "settings", None) if settings is not None else None
    url = getattr(settings, "scheduler_url", None) or os.environ.get("PAGEDFLEET_SCHEDULER_URL")
    return (url or DEFAULT_SCHEDULER_URL).rstrip("/")


def make_block_map_router(source: Callable[[], Any] | None = None, scheduler_url: str | None = None,
                          timeout_s: float = 2.0) -> APIRouter:
    router = APIRouter(tags=["block map"])

    @router.get("/dashboard", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/v1/block-map")
    async def block_map(request: Request) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if source is not None:
            data = source()
            if inspect.isawaitable(data):
                data = await data
            return JSONResponse(await redact_request_ids(request, data), headers=headers)
        url = scheduler_url_for(request, scheduler_url) + "/block-map"
        try:
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                r = await client.get(url)
            r.raise_for_status()
            data = r.json()
        except Exception as e:  # the page shows the error and keeps polling
            return JSONResponse({"workers": [], "error": f"scheduler block map at {url}: {e}"},
                                status_code=502, headers=headers)
        return JSONResponse(await redact_request_ids(request, data), headers=headers)

    return router


router = make_block_map_router()
