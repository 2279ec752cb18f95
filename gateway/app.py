"""The gateway app: `create_app(settings)`; run it with `python -m gateway.app` (uvicorn; flags and environment:
GatewaySettings, gateway/settings.py).

State lives in `app.state` (the FleetClient: a Redis pool, the tokenizer, the model's name) and reaches
routes through FastAPI dependencies; requests and jobs live in Redis, so replicas are interchangeable.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from protocol.heap import freeze_heap
from protocol.redis_conn import async_client
from fastapi import FastAPI

from gateway import batch_routes, block_map, files_routes, job_routes, routes
from gateway.access_log import AccessLog
from gateway.auth import ApiKeyAuth
from gateway.body_limit import BodySizeLimit
from gateway.file_store import FileStore
from gateway.errors import install_error_handlers
from gateway.fleet import FleetClient, FleetError, ModelInfo
from gateway.lease import GatewayLease
from gateway.metrics import gateway_metrics, metrics_process_gone, multiprocess_metrics_dir
from gateway.responses import TokenText
from gateway.model_info import load_model_info
from gateway.settings import GatewaySettings

log = logging.getLogger("pagedfleet.gateway")


def _lifespan(settings: GatewaySettings, model_info: ModelInfo | None, freeze: bool):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = model_info or load_model_info(settings)
        r = async_client(settings.redis_url, decode_responses=True, max_block_ms=1000,
                         connection_pool_class=aioredis.BlockingConnectionPool, max_connections=1024, timeout=30)
        lease = GatewayLease(settings.redis_url)  # the scheduler aborts this gateway's streams once the lease lapses
        await lease.start()
        app.state.fleet = FleetClient(r, info, settings, instance=lease.instance)
        app.state.files = FileStore(r, settings)
        app.state.token_text = TokenText(info.tokenizer)
        app.state.metrics = gateway_metrics()
        app.state.metrics.ensure_model(info.name)
        if freeze:  # the libraries and the tokenizer: out of the collections the output deltas trigger
            freeze_heap()
        yield
        await lease.stop()
        await app.state.fleet.aclose()
        await r.connection_pool.aclose()
        metrics_process_gone()

    return lifespan


def create_app(settings: GatewaySettings | None = None, model_info: ModelInfo | None = None, *,
               service: bool = False) -> FastAPI:
    """``service``: the app is the gateway process's (`python -m gateway.app`): its heap is frozen once it has
    started (protocol/heap.py); an app made inside another process (a test's) leaves that process's alone."""
    settings = settings or GatewaySettings()
    app = FastAPI(title="PagedFleet gateway", version="1", lifespan=_lifespan(settings, model_info, service))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       per_path={"/v1/files": settings.max_file_bytes + 64 * 1024})  # + the multipart framing
    keys = settings.all_api_keys()
    app.add_middleware(ApiKeyAuth, keys=keys, settings=settings)
    app.add_middleware(AccessLog)  # added last: outermost, so a 401 or 413 is logged too
    app.state.settings = settings
    app.state.auth_enabled = bool(keys)
    app.state.metrics = None
    for router in (routes.router, job_routes.router, files_routes.router, batch_routes.router,
                   gateway_metrics().router(), block_map.router):
        app.include_router(router)
    install_error_handlers(app, FleetError)
    return app


SETTINGS_ENV = "PAGEDFLEET_GATEWAY_SETTINGS_JSON"  # the parent's settings, for each of --processes N


def app_from_env() -> FastAPI:
    """The app of one of several gateway processes (uvicorn's factory): the settings the parent parsed."""
    settings = GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV])
    settings.setup_logging()
    return create_app(settings, service=True)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    settings = GatewaySettings.from_cli(argv)
    settings.setup_logging()
    # uvicorn's logging config off (protocol/logs.py set it up) and its access log off (gateway/access_log.py)
    run = dict(host=settings.host, port=settings.port, log_config=None, access_log=False,
               log_level=settings.log_level.lower(), timeout_graceful_shutdown=3,
               timeout_keep_alive=settings.keep_alive_s)
    if settings.processes == 1:
        uvicorn.run(create_app(settings, service=True), **run)
        return 0
    # several processes accept on one socket: uvicorn starts them (and starts again one that dies); each has
    # its own Redis pool, output reader and lease, and /metrics adds up every process's values
    metrics_dir, ours = multiprocess_metrics_dir()
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    try:
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.processes, **run)
    finally:
        if ours:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
