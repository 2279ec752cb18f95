"""The OpenAI-compatible routes: completions, chat completions, models; and /health."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.access_log import track
from gateway.api_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from gateway.deps import Fleet, JsonBody, Metrics, Texts
from gateway.follow import collect_unless_disconnected, finish_metrics, raise_on_error, start_metrics
from gateway.prepare import check_model, prepare_chat, prepare_completion, processors, submit
from gateway.responses import chat_response, completion_response, new_id
from gateway.streaming import STREAM_RESPONSE, chat_events, completion_events, event_stream
from gateway.tokenize_routes import router as tokenize_router

router = APIRouter()
router.include_router(tokenize_router)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 500, 503)}
_DISCONNECTED = {"error": {"message": "client disconnected", "type": "aborted"}}


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAM_RESPONSE},
             dependencies=[JsonBody])
async def create_completion(body: CompletionRequest, request: Request, fleet: Fleet, tt: Texts, metrics: Metrics):
    rid = new_id("cmpl")
    prep = await prepare_completion(fleet, body, rid)
    procs = processors(fleet, prep, body.include_stop_str_in_output)
    track(request, rid, procs)
    want_lp = body.logprobs is not None
    mtracks = start_metrics(metrics, prep)
    await submit(fleet, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = completion_events(rid, prep, fleet, procs, mtracks, tt, want_lp, include_usage)
        return event_stream(events, fleet, rid, procs, mtracks)
    if not await collect_unless_disconnected(request, fleet, procs, mtracks):
        finish_metrics(mtracks, "abort")
        return JSONResponse(_DISCONNECTED, status_code=499)
    raise_on_error(procs)
    return completion_response(rid, prep.model, procs, tt, want_lp, prep=prep)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JsonBody])
async def create_chat_completion(body: ChatCompletionRequest, request: Request, fleet: Fleet, tt: Texts,
                                 metrics: Metrics):
    rid = new_id("chatcmpl")
    prep = await prepare_chat(fleet, body, rid)
    procs = processors(fleet, prep, body.include_stop_str_in_output)
    track(request, rid, procs)
    mtracks = start_metrics(metrics, prep)
    await submit(fleet, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(rid, prep, fleet, procs[0], mtracks, tt, body.logprobs, include_usage)
        return event_stream(events, fleet, rid, procs, mtracks)
    if not await collect_unless_disconnected(request, fleet, procs, mtracks):
        finish_metrics(mtracks, "abort")
        return JSONResponse(_DISCONNECTED, status_code=499)
    raise_on_error(procs)
    return chat_response(rid, prep.model, procs[0], tt, body.logprobs, tool_names=prep.tool_names)


@router.get("/v1/models", response_model=ModelList)
async def list_models(fleet: Fleet) -> ModelList:
    workers = [w for w in await fleet.live_workers() if fleet.serves(w.info.model)]
    return ModelList(data=[ModelCard(id=fleet.model.name, max_model_len=await fleet.max_model_len(),
                                     workers=len(workers))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, fleet: Fleet) -> ModelCard:
    check_model(fleet, model_id)
    workers = [w for w in await fleet.live_workers() if fleet.serves(w.info.model)]
    return ModelCard(id=fleet.model.name, max_model_len=await fleet.max_model_len(), workers=len(workers))


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(fleet: Fleet):
    """200 when Redis answers, the scheduler holds its lease and a worker is live; else 503 naming
    what is missing (`unavailable`: Redis; `degraded`: the scheduler and/or every worker)."""
    try:
        await asyncio.wait_for(fleet.redis.ping(), timeout=2.0)
        scheduler = await fleet.scheduler_alive()
        workers = len(await fleet.live_workers(fresh=True))
    except Exception as e:
        body = HealthResponse(status="unavailable", redis=False, workers=0, missing=["redis"],
                              detail=f"redis does not answer: {e}")
        return JSONResponse(body.model_dump(), status_code=503)
    missing = [name for name, ok in (("scheduler", scheduler), ("workers", workers > 0)) if not ok]
    if missing:
        detail = "; ".join({"scheduler": "no scheduler holds the lease",
                            "workers": "no worker registered"}[m] for m in missing)
        body = HealthResponse(status="degraded", redis=True, scheduler=scheduler, workers=workers,
                              missing=missing, detail=detail)
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthResponse(status="ok", redis=True, scheduler=True, workers=workers)
