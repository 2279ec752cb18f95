"""The Celery app of the Batch API: the gateway sends `pagedfleet.run_batch(batch_id)` to the queue
`pagedfleet-batch`; a batch worker runs it (gateway/batch/runner.py). JSON only, never pickle.

    celery -A gateway.batch.worker worker -Q pagedfleet-batch --pool threads --concurrency 4

A run holds its batch's lease in Redis. Every batch worker also runs a sweeper thread: every
`batch_lease_s` it queues a run for each open batch whose lease lapsed (its runner died with its worker),
so a killed worker's batches resume on any live one (or on itself, restarted) within a few lease periods.
Settings are `GatewaySettings` (environment `PAGEDFLEET_*`), read when the app is first asked for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading

import redis.asyncio as aioredis
from celery import Celery
from celery.signals import worker_ready

from gateway.batch import store
from gateway.settings import GatewaySettings
from protocol.celery_app import json_celery_app
from protocol.redis_conn import OUTAGE_ERRORS, async_client, sync_client

log = logging.getLogger("pagedfleet.batch")

QUEUE = "pagedfleet-batch"
TASK = "pagedfleet.run_batch"


def make_app(settings: GatewaySettings) -> Celery:
    """The Celery app: broker on the fleet's Redis, JSON only; a run is acknowledged when it starts (a
    worker that dies mid-run is covered by the lease and the sweeper, not by redelivery)."""
    app = json_celery_app("pagedfleet-batch", settings.redis_url, log_level=settings.log_level,
                          log_format=settings.log_format, task_default_queue=QUEUE, task_ignore_result=True,
                          worker_prefetch_multiplier=1, task_acks_late=False)

    @app.task(name=TASK)
    def run_batch(batch_id: str) -> str | None:
        return asyncio.run(run_batch_once(settings, batch_id))

    return app


def queued_ttl_s(settings: GatewaySettings) -> int:
    """How long a queued run keeps others from being queued (then a lapsed lease queues another)."""
    return max(5, int(6 * settings.batch_lease_s))


def enqueue(app: Celery, r, settings: GatewaySettings, batch_id: str) -> bool:
    """Queue a run unless one is queued already (sync client `r`)."""
    if not r.set(store.queued_key(batch_id), "1", nx=True, ex=queued_ttl_s(settings)):
        return False
    app.send_task(TASK, args=[batch_id], queue=QUEUE)
    return True


_MODEL_INFO: dict[int, object] = {}
_MODEL_INFO_LOCK = threading.Lock()


def _model_info(settings: GatewaySettings):
    """The served model's tokenizer and limits, loaded once per process (the runs share it)."""
    from gateway.model_info import load_model_info

    with _MODEL_INFO_LOCK:
        if id(settings) not in _MODEL_INFO:
            _MODEL_INFO[id(settings)] = load_model_info(settings)
        return _MODEL_INFO[id(settings)]


async def run_batch_once(settings: GatewaySettings, batch_id: str) -> str | None:
    from gateway.batch.runner import BatchRunner
    from gateway.file_store import FileStore
    from gateway.fleet import FleetClient

    r = async_client(settings.redis_url, decode_responses=True, max_block_ms=1000,
                     connection_pool_class=aioredis.BlockingConnectionPool, max_connections=256, timeout=30)
    fleet = FleetClient(r, _model_info(settings), settings)
    runner = BatchRunner(fleet, FileStore(r, settings), batch_id)
    try:
        if not await runner.acquire():
            return None  # another worker runs it
        try:
            return await runner.run()
        finally:
            await runner.release()
    finally:
        await fleet.aclose()
        await r.connection_pool.disconnect()


def sweep_once(app: Celery, r, settings: GatewaySettings) -> list[str]:
    """Queue a run for every open batch that no runner holds; returns their ids."""
    queued = []
    for batch_id in r.smembers(store.OPEN):
        if not r.exists(store.batch_key(batch_id)):
            r.srem(store.OPEN, batch_id)
        elif not r.exists(store.lease_key(batch_id)) and enqueue(app, r, settings, batch_id):
            queued.append(batch_id)
    return queued


def _sweeper(app: Celery, settings: GatewaySettings) -> None:
    stop = threading.Event()
    r = sync_client(settings.redis_url, decode_responses=True)
    while not stop.wait(settings.batch_lease_s):
        try:
            for batch_id in sweep_once(app, r, settings):
                log.info("batch %s: no runner holds it; queued a run to resume it", batch_id)
        except OUTAGE_ERRORS as e:
            log.warning("batch sweeper: redis unavailable: %s", e)
        except Exception:  # noqa: BLE001 - the sweeper outlives any one failure
            log.exception("batch sweeper failed")


@functools.cache
def _default() -> tuple[Celery, GatewaySettings]:
    settings = GatewaySettings()
    return make_app(settings), settings


@worker_ready.connect(weak=False)
def _start_sweeper(sender=None, **_kw) -> None:
    app, settings = _default()
    threading.Thread(target=_sweeper, args=(app, settings), name="batch-sweeper", daemon=True).start()


def __getattr__(name: str) -> Celery:
    # `celery -A gateway.batch.worker` asks for `app`: built (and the environment read) only then
    if name == "app":
        return _default()[0]
    raise AttributeError(name)
