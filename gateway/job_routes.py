"""The job API: POST /v1/jobs (a completion or chat body, answered at once with 202), GET /v1/jobs (the
caller's jobs, newest first, paginated, filtered by status), GET and DELETE /v1/jobs/{id}. Jobs live in
Redis; any gateway replica can answer for any job. A job is visible only to the key that made it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from gateway.api_models import ErrorResponse, JobChatRequest, JobRequest, JobView
from gateway.auth import Owner
from gateway.deps import Fleet, JsonBody, Texts
from gateway.errors import BadRequest
from gateway.fleet import FleetClient, job_index
from gateway.listing import page
from gateway.idempotency import IDEMPOTENT_ERRORS, REPLAYED_HEADER, KeyHeader, idempotency, made_with
from gateway.prepare import prepare_chat, prepare_completion
from gateway.responses import TokenText, chat_response, completion_response, make_request, new_id
from gateway.routes import ERRORS
from model_io.output_processor import RequestOutputProcessor
from protocol import streams as S
from protocol.jobs import TERMINAL_JOB_STATUSES, JobMeta, JobStatus, final_job_status

log = logging.getLogger("pagedfleet.gateway")

router = APIRouter()


def _job_view(raw: dict, result: dict | None = None) -> JobView:
    meta = JobMeta.model_validate_json(raw["meta"])
    res = result if result is not None else (json.loads(raw["result"]) if raw.get("result") else None)
    return JobView(
        id=meta.job_id, kind=meta.kind, model=meta.model, status=raw.get("status", "queued"),
        created_at=meta.created_at, updated_at=float(raw["updated_at"]) if raw.get("updated_at") else None,
        finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None, result=res,
        error=raw.get("error") or None,
    )


def _job_result(meta: JobMeta, proc: RequestOutputProcessor, tt: TokenText) -> dict:
    created = int(meta.created_at)
    if meta.kind == "chat":
        resp = chat_response(meta.job_id, meta.model, proc, tt, meta.want_logprobs, created)
    else:
        resp = completion_response(meta.job_id, meta.model, [proc], tt, meta.want_logprobs, created)
    return resp.model_dump()


def _job_final_status(proc: RequestOutputProcessor) -> tuple[JobStatus, str | None]:
    return final_job_status(proc.error, [c.finish_reason for c in proc.completions]), proc.error or None


def _processor(fleet: FleetClient, meta: JobMeta) -> RequestOutputProcessor:
    return RequestOutputProcessor(fleet.model.tokenizer, meta.request_id, meta.prompt_token_ids, meta.sampling,
                                  meta.include_stop_str_in_output)


async def run_job(fleet: FleetClient, meta: JobMeta, tt: TokenText) -> None:
    """Follow a job in the gateway that accepted it: stop strings abort it, the result is stored.
    If this gateway goes away, GET /v1/jobs/{id} assembles the result from the output stream instead."""
    proc = _processor(fleet, meta)
    try:
        async for delta in fleet.deltas(meta.request_id):
            proc.apply(delta)
            if proc.done:
                break
        status, error = _job_final_status(proc)
        await fleet.store_job_result(meta.job_id, _job_result(meta, proc, tt), meta.ttl_s)
        await fleet.set_job_status(meta.job_id, status, error)
        if proc.needs_abort:
            proc.abort_sent = True
            await fleet.abort(meta.request_id, "stop string")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the job keeps running in the scheduler; GET assembles its result later
        log.warning("job %s follower stopped: %s", meta.job_id, e)


async def assemble_job(fleet: FleetClient, raw: dict, tt: TokenText) -> dict | None:
    meta = JobMeta.model_validate_json(raw["meta"])
    proc = _processor(fleet, meta)
    seen = False
    async for delta in fleet.deltas(meta.request_id, block=False):
        seen = True
        proc.apply(delta)
        if proc.done:
            break
    if not seen:
        return None
    result = _job_result(meta, proc, tt)
    if proc.done:
        await fleet.store_job_result(meta.job_id, result, meta.ttl_s)
    return result


@router.post("/v1/jobs", status_code=202, response_model=JobView, responses={**ERRORS, **IDEMPOTENT_ERRORS},
             dependencies=[JsonBody])
async def create_job(body: Annotated[JobRequest, Body()], fleet: Fleet, tt: Texts, owner: Owner,
                     idempotency_key: KeyHeader = None):
    """With an `Idempotency-Key` header, a retry gets the job its first try made (gateway/idempotency.py)."""
    kind = "chat" if isinstance(body, JobChatRequest) else "completion"
    job_body = body.model_dump(mode="json", exclude_unset=True, exclude={"kind"})
    idem = idempotency("jobs", owner, idempotency_key, {"kind": kind, **job_body})
    if (made := await made_with(fleet.redis, idem)) is not None:
        return await _created_job_view(fleet, made, replayed=True)
    job_id = new_id("job")
    if kind == "chat":
        prep = await prepare_chat(fleet, body, job_id)
        want_lp = bool(body.logprobs)
    else:
        if len(body.prompts()) != 1:
            raise BadRequest("prompt: a job takes a single prompt", "prompt")
        prep = await prepare_completion(fleet, body, job_id)
        want_lp = body.logprobs is not None
    meta = JobMeta(job_id=job_id, kind=kind, model=prep.model, body=job_body, request_id=job_id,
                   prompt_token_ids=prep.prompts[0], sampling=prep.params,
                   include_stop_str_in_output=body.include_stop_str_in_output, want_logprobs=want_lp,
                   created_at=time.time(), ttl_s=fleet.settings.job_ttl_s)
    request = make_request(job_id, prep.prompts[0], prep.params, prep.priority)
    job_id, replayed = await fleet.create_job(meta, request, owner, idem)
    if not replayed:
        fleet.spawn(run_job(fleet, meta, tt))
    return await _created_job_view(fleet, job_id, replayed)


async def _created_job_view(fleet: FleetClient, job_id: str, replayed: bool) -> JSONResponse:
    raw = await fleet.get_job(job_id)
    if raw is None or "meta" not in raw:
        raise BadRequest(f"job {job_id!r}, made with this Idempotency-Key, has expired", "job_id", 404,
                         "job_not_found")
    return JSONResponse(_job_view(raw).model_dump(), status_code=202,
                        headers={REPLAYED_HEADER: "true"} if replayed else None)


async def _existing_job(fleet: FleetClient, job_id: str, owner: str) -> dict:
    raw = await fleet.get_job(job_id)
    if raw is None or "meta" not in raw or raw.get("owner", "") != owner:
        raise BadRequest(f"job {job_id!r} does not exist (or expired)", "job_id", 404, "job_not_found")
    return raw


@router.get("/v1/jobs", responses=ERRORS)
async def list_jobs(fleet: Fleet, owner: Owner, limit: Annotated[int, Query()] = 20,
                    after: Annotated[str | None, Query()] = None,
                    status: Annotated[JobStatus | None, Query()] = None) -> dict:
    """The caller's jobs, newest first: `{"object": "list", "data", "first_id", "last_id", "has_more"}`."""
    async def load(ids: list[str]) -> list[dict | None]:
        async with fleet.redis.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(S.job_key(i))
            raws = await p.execute()
        return [_job_view(raw).model_dump() if raw and "meta" in raw else None for raw in raws]

    return await page(fleet.redis, job_index(owner), limit, after, load,
                      lambda j: status is None or j["status"] == status.value)


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(job_id: str, fleet: Fleet, tt: Texts, owner: Owner):
    raw = await _existing_job(fleet, job_id, owner)
    result = None
    if not raw.get("result") and raw.get("status") in TERMINAL_JOB_STATUSES:
        result = await assemble_job(fleet, raw, tt)
    return _job_view(raw, result)


@router.delete("/v1/jobs/{job_id}", response_model=JobView, responses={**ERRORS, 409: {"model": ErrorResponse}})
async def cancel_job(job_id: str, fleet: Fleet, owner: Owner):
    raw = await _existing_job(fleet, job_id, owner)
    if raw.get("status") in TERMINAL_JOB_STATUSES:
        raise BadRequest(f"job {job_id!r} is already {raw['status']}", "job_id", 409, "job_finished")
    meta = JobMeta.model_validate_json(raw["meta"])
    await fleet.set_job_status(job_id, JobStatus.CANCELLED)
    await fleet.abort(meta.request_id, "cancelled by the user")
    return _job_view(await fleet.get_job(job_id))
