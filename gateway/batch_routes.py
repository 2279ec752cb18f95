"""The Batch API: POST /v1/batches, GET /v1/batches (paginated), GET /v1/batches/{id},
POST /v1/batches/{id}/cancel. A batch is visible only to the key that made it (another key gets 404).
The work is done by the Celery batch workers (gateway/batch/); these routes keep the records."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Owner
from gateway.batch import store
from gateway.deps import JsonBody
from gateway.errors import BadRequest
from gateway.files_routes import Files, owned_file
from gateway.idempotency import IDEMPOTENT_ERRORS, REPLAYED_HEADER, KeyHeader, idempotency, made_with
from gateway.listing import owner_index, page
from gateway.routes import ERRORS

log = logging.getLogger("pagedfleet.gateway")

router = APIRouter(tags=["batches"])


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str = Field(max_length=128)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; outputs are kept RECORD_TTL_S


def _celery(request: Request):
    app = getattr(request.app.state, "batch_celery", None)
    if app is None:
        from gateway.batch.worker import make_app

        app = request.app.state.batch_celery = make_app(request.app.state.settings)
    return app


async def _queue_run(request: Request, batch_id: str) -> None:
    """Queue the batch's run; if the broker is away the batch stays open and a worker's sweeper queues it."""
    from gateway.batch.worker import queued_ttl_s, TASK, QUEUE

    r = request.app.state.fleet.redis
    settings = request.app.state.settings
    await r.set(store.queued_key(batch_id), "1", ex=queued_ttl_s(settings))
    try:
        await to_thread.run_sync(lambda: _celery(request).send_task(TASK, args=[batch_id], queue=QUEUE))
    except Exception as e:  # noqa: BLE001
        log.warning("batch %s: could not queue its run (%s); a batch worker's sweeper will", batch_id, e)
        await r.delete(store.queued_key(batch_id))


async def _owned(request: Request, batch_id: str, owner: str) -> dict:
    raw = await store.get_batch(request.app.state.fleet.redis, batch_id, owner)
    if raw is None:
        raise BadRequest(f"No such Batch object: {batch_id}", "batch_id", 404, "batch_not_found")
    return raw


@router.post("/v1/batches", responses={**ERRORS, **IDEMPOTENT_ERRORS}, dependencies=[JsonBody])
async def create_batch(body: BatchCreate, request: Request, response: Response, files: Files, owner: Owner,
                       idempotency_key: KeyHeader = None) -> dict:
    """With an `Idempotency-Key` header, a retry gets the batch its first try made (gateway/idempotency.py)."""
    r = request.app.state.fleet.redis
    idem = idempotency("batches", owner, idempotency_key, body.model_dump(mode="json", exclude_unset=True))
    if (made := await made_with(r, idem)) is not None:  # even when its input file is gone since
        response.headers[REPLAYED_HEADER] = "true"
        return await _created_batch_view(r, made)
    if body.endpoint not in store.ENDPOINTS:
        raise BadRequest(f"endpoint: must be one of {list(store.ENDPOINTS)}, not {body.endpoint!r}", "endpoint")
    if body.completion_window not in store.WINDOW_S:
        raise BadRequest(f"completion_window: must be one of {list(store.WINDOW_S)}", "completion_window")
    f = await owned_file(files, body.input_file_id, owner)
    if f["purpose"] != "batch":
        raise BadRequest(f"input_file_id: file {f['id']} has purpose {f['purpose']!r}, not 'batch'",
                         "input_file_id")
    batch_id, replayed = await store.create_batch(r, owner, body.endpoint, body.input_file_id,
                                                  body.completion_window, body.metadata, idem)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    else:
        await _queue_run(request, batch_id)
    return await _created_batch_view(r, batch_id)


async def _created_batch_view(r, batch_id: str) -> dict:
    raw = await store.get_batch(r, batch_id)
    if raw is None:
        raise BadRequest(f"batch {batch_id}, made with this Idempotency-Key, has expired", "batch_id", 404,
                         "batch_not_found")
    return store.batch_view(batch_id, raw)


@router.get("/v1/batches", responses=ERRORS)
async def list_batches(request: Request, owner: Owner, limit: Annotated[int, Query()] = 20,
                       after: Annotated[str | None, Query()] = None) -> dict[str, Any]:
    r = request.app.state.fleet.redis

    async def load(ids: list[str]) -> list[dict | None]:
        async with r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(store.batch_key(i))
            raws = await p.execute()
        return [store.batch_view(i, raw) if raw and "meta" in raw else None for i, raw in zip(ids, raws)]

    return await page(r, owner_index("batches", owner), limit, after, load)


@router.get("/v1/batches/{batch_id}", responses=ERRORS)
async def get_batch(batch_id: str, request: Request, owner: Owner) -> dict:
    return store.batch_view(batch_id, await _owned(request, batch_id, owner))


@router.post("/v1/batches/{batch_id}/cancel", responses=ERRORS)
async def cancel_batch(batch_id: str, request: Request, owner: Owner) -> dict:
    """validating / in_progress -> cancelling (the runner stops its lines and ends it as cancelled)."""
    raw = await _owned(request, batch_id, owner)
    r = request.app.state.fleet.redis
    if raw["status"] in ("validating", "in_progress"):
        await store.set_status(r, batch_id, "cancelling",
                               unless=store.TERMINAL + ("cancelling", "finalizing"))
    elif raw["status"] not in ("cancelling", "cancelled"):
        raise BadRequest(f"batch {batch_id} is {raw['status']}: it can no longer be cancelled", "batch_id", 409,
                         "batch_not_cancellable")
    return store.batch_view(batch_id, await store.get_batch(r, batch_id))
