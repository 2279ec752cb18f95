"""One access line per API request (replaces uvicorn's access log): method, path, status, latency in ms,
prompt and output tokens, request id. Written when the response is done (a stream: when it ends), as
``pagedfleet.access`` at INFO; polling paths (/health, /metrics, the dashboard and its block map) at DEBUG,
so an open dashboard or a probe writes nothing at the default level."""

from __future__ import annotations

import logging
import time

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.responses import usage_of

log = logging.getLogger("pagedfleet.access")

QUIET_PREFIXES = ("/health", "/metrics", "/dashboard", "/v1/block-map", "/block-map", "/favicon.ico")


def track(request: Request, request_id: str, procs: list) -> None:
    """Let the access line name the request and count its tokens (from its output processors, at the end)."""
    request.state.access = (request_id, procs)


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # the dict behind request.state
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._write(scope, state, status, (time.perf_counter() - t0) * 1000.0)

    @staticmethod
    def _write(scope: Scope, state: dict, status: int, ms: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path.startswith(QUIET_PREFIXES) else logging.INFO
        if not log.isEnabledFor(level):
            return
        rid, procs = state.get("access") or ("-", [])
        usage = usage_of(procs) if procs else None
        p, c = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        log.log(level, '%s %s %d %.1fms prompt_tokens=%d output_tokens=%d request_id=%s', scope.get("method", ""),
                path, status, ms, p, c, rid,
                extra={"method": scope.get("method"), "path": path, "status": status, "latency_ms": round(ms, 1),
                       "prompt_tokens": p, "output_tokens": c, "request_id": rid})
