"""The gateway app: `create_app(settings)`; run it with `python -m gateway.app` (uvicorn).

State lives in `app.state` (the FleetClient: a Redis pool, the tokenizer, the model's name) and reaches
routes through FastAPI dependencies; requests and jobs live in Redis, so replicas are interchangeable.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from protocol.redis_conn import async_client
from fastapi import FastAPI

from gateway import batch_routes, files_routes, job_routes, routes
from gateway.auth import ApiKeyAuth
from gateway.body_limit import BodySizeLimit
from gateway.file_store import FileStore
from gateway.errors import install_error_handlers
from gateway.fleet import FleetClient, FleetError, ModelInfo
from gateway.responses import TokenText
from gateway.model_info import load_model_info
from gateway.settings import GatewaySettings

log = logging.getLogger("pagedfleet.gateway")


def create_app(settings: GatewaySettings | None = None, model_info: ModelInfo | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = model_info or load_model_info(settings)
        r = async_client(settings.redis_url, decode_responses=True, max_block_ms=1000,
                         connection_pool_class=aioredis.BlockingConnectionPool, max_connections=1024, timeout=30)
        pool = r.connection_pool
        app.state.fleet = FleetClient(r, info, settings)
        app.state.files = FileStore(r, settings)
        app.state.token_text = TokenText(info.tokenizer)
        try:
            from gateway.metrics import gateway_metrics

            app.state.metrics = gateway_metrics()
            app.state.metrics.ensure_model(info.name)
        except Exception:  # pragma: no cover - metrics are optional
            app.state.metrics = None
        yield
        await app.state.fleet.aclose()
        await pool.aclose()

    app = FastAPI(title="PagedFleet gateway", version="1", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       per_path={"/v1/files": settings.max_file_bytes + 64 * 1024})  # + the multipart framing
    keys = settings.all_api_keys()
    app.add_middleware(ApiKeyAuth, keys=keys, settings=settings)  # added last: runs first
    app.state.settings = settings
    app.state.auth_enabled = bool(keys)
    app.state.metrics = None
    for router in (routes.router, job_routes.router, files_routes.router, batch_routes.router):
        app.include_router(router)

    try:
        from gateway.metrics import gateway_metrics

        app.include_router(gateway_metrics().router())
    except Exception:  # pragma: no cover
        from fastapi import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    try:  # the block map page (monitoring engineer's module), when present
        from gateway import block_map

        r = getattr(block_map, "router", None)
        if r is None and hasattr(block_map, "make_router"):
            r = block_map.make_router()
        if r is not None:
            app.include_router(r)
    except ImportError:
        pass

    install_error_handlers(app, FleetError)
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m gateway.app", description="PagedFleet gateway")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--scheduler-url", default=None, help="the scheduler service (default: $PAGEDFLEET_SCHEDULER_URL "
                                                         "or http://127.0.0.1:8001)")
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send (repeatable; default: $PAGEDFLEET_API_KEY(S); none: open API)")
    p.add_argument("--api-key-file", default=None, help="a file of API keys, one per line")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in {"host": a.host, "port": a.port, "redis_url": a.redis_url, "model": a.model,
                                   "model_dir": a.model_dir, "served_model_name": a.served_model_name,
                                   "scheduler_url": a.scheduler_url, "api_keys": a.api_key,
                                   "api_key_file": a.api_key_file}.items()
                 if v is not None}
    settings = GatewaySettings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=a.log_level,
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
