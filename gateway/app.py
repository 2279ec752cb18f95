"""The gateway app: `create_app(settings)`; run it with `python -m gateway.app` (uvicorn).

State lives in `app.state` (the FleetClient: a Redis pool, the tokenizer, the model's name) and reaches
routes through FastAPI dependencies; requests and jobs live in Redis, so replicas are interchangeable.
"""

from __future__ import annotations

import argparse
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis

from protocol.redis_conn import async_client
from fastapi import FastAPI

from gateway import job_routes, routes
from gateway.body_limit import BodySizeLimit
from gateway.errors import install_error_handlers
from gateway.fleet import FleetClient, FleetError, ModelInfo
from gateway.lease import GatewayLease
from gateway.responses import TokenText
from gateway.settings import GatewaySettings

log = logging.getLogger("pagedfleet.gateway")


def load_model_info(settings: GatewaySettings) -> ModelInfo:
    """The served model's tokenizer and limits (from its files; the workers' WorkerInfo overrides)."""
    from model_io.tokenizer import Tokenizer

    model_dir: Path | None = Path(settings.model_dir) if settings.model_dir else None
    name = settings.served_model_name
    if model_dir is None:
        from model_io.model_files import resolve_model

        files = resolve_model(settings.model)
        model_dir = Path(files.path) if files.path is not None else None
        name = name or files.name
    name = name or settings.model or (model_dir.name if model_dir else "default")
    tokenizer = Tokenizer(model_dir) if model_dir is not None and (model_dir / "tokenizer.json").exists() else None
    max_len, vocab = settings.max_model_len, None
    cfg = model_dir / "config.json" if model_dir is not None else None
    if cfg is not None and cfg.exists():
        c = json.loads(cfg.read_text())
        max_len = max_len or c.get("max_position_embeddings")
        vocab = c.get("vocab_size")
    aliases = {name}
    if settings.model:
        aliases.add(settings.model)
    return ModelInfo(name=name, aliases=aliases, model_dir=model_dir, tokenizer=tokenizer,
                     default_max_model_len=int(max_len or 2048), vocab_size=vocab)


def create_app(settings: GatewaySettings | None = None, model_info: ModelInfo | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = model_info or load_model_info(settings)
        r = async_client(settings.redis_url, decode_responses=True, max_block_ms=1000,
                         connection_pool_class=aioredis.BlockingConnectionPool, max_connections=1024, timeout=30)
        pool = r.connection_pool
        lease = GatewayLease(r)
        await lease.start()
        app.state.fleet = FleetClient(r, info, settings, instance=lease.instance)
        app.state.token_text = TokenText(info.tokenizer)
        try:
            from gateway.metrics import gateway_metrics

            app.state.metrics = gateway_metrics()
            app.state.metrics.ensure_model(info.name)
        except Exception:  # pragma: no cover - metrics are optional
            app.state.metrics = None
        yield
        await lease.stop()
        await app.state.fleet.aclose()
        await pool.aclose()

    app = FastAPI(title="PagedFleet gateway", version="1", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.settings = settings
    app.state.metrics = None
    app.include_router(routes.router)
    app.include_router(job_routes.router)

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
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in {"host": a.host, "port": a.port, "redis_url": a.redis_url, "model": a.model,
                                   "model_dir": a.model_dir, "served_model_name": a.served_model_name,
                                   "scheduler_url": a.scheduler_url}.items()
                 if v is not None}
    settings = GatewaySettings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=a.log_level,
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
