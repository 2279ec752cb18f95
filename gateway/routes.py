"""HTTP routes: OpenAI-compatible completions and chat, models, health, and the job API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from gateway.api_models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    HealthResponse,
    JobView,
    ModelCard,
    ModelList,
)
from gateway.fleet import FleetClient, FleetError
from gateway.generation import (
    BadRequest,
    OutputTracker,
    TokenText,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    make_request,
    new_id,
    sampling_params,
    usage_of,
    validation_message,
)
from protocol import SamplingParams
from protocol import streams as S
from protocol.jobs import TERMINAL_JOB_STATUSES, JobMeta, JobStatus, final_job_status

log = logging.getLogger("pagedfleet.gateway")

router = APIRouter()

ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


# ------------------------------------------------------------------------------------------------
# dependencies


def get_fleet(request: Request) -> FleetClient:
    return request.app.state.fleet


def get_token_text(request: Request) -> TokenText:
    return request.app.state.token_text


def get_metrics(request: Request):
    return request.app.state.metrics


# ------------------------------------------------------------------------------------------------
# preparing requests


@dataclass
class Prepared:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    model: str
    priority: int


def _check_model(fleet: FleetClient, name: str | None) -> str:
    if not fleet.serves(name):
        raise BadRequest(
            f"model: {name!r} does not exist here; this fleet serves {fleet.model.name!r}", "model", 404,
            "model_not_found",
        )
    return fleet.model.name


async def _check_prompt(fleet: FleetClient, ids: list[int], what: str = "prompt") -> None:
    if not ids:
        raise BadRequest(f"{what}: must not be empty", what)
    vocab = await fleet.vocab_size()
    if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
        raise BadRequest(f"{what}: token ids must be in [0, {vocab})", what)
    max_len = await fleet.max_model_len()
    if len(ids) >= max_len:
        raise BadRequest(
            f"{what}: {len(ids)} tokens do not fit the model's context of {max_len} tokens", what,
            code="context_length_exceeded",
        )


def _tokenizer(fleet: FleetClient):
    tok = fleet.model.tokenizer
    if tok is None:
        raise BadRequest("this model has no tokenizer: pass prompts as token ids", "prompt")
    return tok


async def prepare_completion(fleet: FleetClient, body: CompletionRequest, base_id: str) -> Prepared:
    model = _check_model(fleet, body.model)
    params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16)
    prompts = []
    for p in body.prompts():
        ids = list(p) if isinstance(p, list) else _tokenizer(fleet).encode(p)
        await _check_prompt(fleet, ids)
        prompts.append(ids)
    rids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    return Prepared(rids, prompts, params, model, body.priority)


async def prepare_chat(fleet: FleetClient, body: ChatCompletionRequest, base_id: str) -> Prepared:
    model = _check_model(fleet, body.model)
    tok = _tokenizer(fleet)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = tok.encode_chat(messages, body.add_generation_prompt)
    except Exception as e:  # template errors (raise_exception in the template) name the problem
        raise BadRequest(f"messages: {e}", "messages") from None
    await _check_prompt(fleet, ids, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(1, await fleet.max_model_len() - len(ids))
    params = sampling_params(body, max_tokens)
    return Prepared([base_id], [ids], params, model, body.priority)


def _trackers(fleet: FleetClient, prep: Prepared, include_stop: bool) -> list[OutputTracker]:
    return [OutputTracker(fleet.model.tokenizer, rid, ids, prep.params, include_stop)
            for rid, ids in zip(prep.request_ids, prep.prompts)]


async def _submit(fleet: FleetClient, prep: Prepared, job_id: str | None = None) -> None:
    for rid, ids in zip(prep.request_ids, prep.prompts):
        await fleet.submit(make_request(rid, ids, prep.params, prep.priority), job_id=job_id)


# ------------------------------------------------------------------------------------------------
# following a request


async def follow(fleet: FleetClient, tracker: OutputTracker, mtrack=None) -> AsyncIterator[list]:
    """Apply the request's deltas to `tracker`, yielding the choice updates of each; aborts the request
    once every completion hit a stop string. Returns when there is nothing more to show."""
    async for delta in fleet.deltas(tracker.request_id):
        if mtrack is not None:
            mtrack.on_delta(delta)
        updates = tracker.apply(delta)
        if tracker.needs_abort:
            tracker.abort_sent = True
            await fleet.abort(tracker.request_id, "stop string")
        yield updates
        if tracker.done:
            break
    if mtrack is not None:
        reasons = [s.finish_reason for s in tracker.seqs if s.finish_reason]
        mtrack.finish(reasons[0] if reasons else ("error" if tracker.error else "abort"))


async def _merged(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    if len(gens) == 1:
        async for x in gens[0]:
            yield 0, x
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for x in g:
                await q.put((i, x, None))
        except BaseException as e:  # noqa: BLE001 - passed on to the consumer
            await q.put((i, None, e))
            return
        await q.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, x, err = await q.get()
            if err is not None:
                raise err
            if x is None:
                left -= 1
                continue
            yield i, x
    finally:
        for t in tasks:
            t.cancel()


def _abort_unfinished(fleet: FleetClient, trackers: list[OutputTracker], reason: str) -> None:
    for t in trackers:
        if not t.finished and not t.abort_sent:
            t.abort_sent = True
            fleet.abort_soon(t.request_id, reason)


async def _collect(fleet: FleetClient, trackers: list[OutputTracker], mtracks: list) -> None:
    async def one(t, m):
        async for _ in follow(fleet, t, m):
            pass

    await asyncio.gather(*(one(t, m) for t, m in zip(trackers, mtracks)))


async def _collect_unless_disconnected(request: Request, fleet: FleetClient, trackers: list[OutputTracker],
                                       mtracks: list) -> bool:
    """Collect every output; returns False if the client went away first (its requests are aborted)."""
    work = asyncio.create_task(_collect(fleet, trackers, mtracks))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.5)
            if done:
                work.result()
                return True
            if await request.is_disconnected():
                work.cancel()
                _abort_unfinished(fleet, trackers, "client disconnected")
                return False
    except BaseException:
        work.cancel()
        _abort_unfinished(fleet, trackers, "gateway error")
        raise


def _raise_on_error(trackers: list[OutputTracker]) -> None:
    for t in trackers:
        if t.error:
            raise FleetError(f"request {t.request_id} failed: {t.error}", 500)


def _sse(obj) -> str:
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


def _sse_error(message: str, code: int = 500) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def _start_metrics(metrics, prep: Prepared) -> list:
    if metrics is None:
        return [None] * len(prep.prompts)
    return [metrics.start_request(prep.model, len(ids)) for ids in prep.prompts]


def _finish_metrics(mtracks: list, reason: str) -> None:
    for m in mtracks:
        if m is not None:
            m.finish(reason)


# ------------------------------------------------------------------------------------------------
# OpenAI API


@router.post("/v1/completions", responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request, fleet: FleetClient = Depends(get_fleet),
                            tt: TokenText = Depends(get_token_text), metrics=Depends(get_metrics)):
    rid = new_id("cmpl")
    prep = await prepare_completion(fleet, body, rid)
    trackers = _trackers(fleet, prep, body.include_stop_str_in_output)
    want_lp = body.logprobs is not None
    mtracks = _start_metrics(metrics, prep)
    await _submit(fleet, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _guarded_sse(_stream_completion(rid, prep, fleet, trackers, mtracks, tt, want_lp, include_usage),
                         fleet, rid, trackers, mtracks),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    if not await _collect_unless_disconnected(request, fleet, trackers, mtracks):
        _finish_metrics(mtracks, "abort")
        return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, status_code=499)
    _raise_on_error(trackers)
    return completion_response(rid, prep.model, trackers, tt, want_lp)


async def _guarded_sse(events: AsyncIterator[str], fleet: FleetClient, rid: str,
                       trackers: list[OutputTracker], mtracks: list) -> AsyncIterator[str]:
    """Every SSE stream ends with [DONE]; a failure becomes an error event instead of a cut stream; and
    whatever still runs when the client goes away (or on an error) is aborted, so its blocks are freed."""
    try:
        async for chunk in events:
            yield chunk
        yield "data: [DONE]\n\n"
    except FleetError as e:
        yield _sse_error(str(e), e.status_code)
        yield "data: [DONE]\n\n"
    except Exception as e:  # Redis went away, ...: tell the client instead of cutting the stream
        log.exception("stream %s failed", rid)
        yield _sse_error(f"internal error: {type(e).__name__}: {e}")
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
        _abort_unfinished(fleet, [t for t in trackers if not t.done], "client disconnected")
        _finish_metrics(mtracks, "abort")


async def _stream_completion(rid, prep: Prepared, fleet, trackers, mtracks, tt, want_lp, include_usage):
    created = int(time.time())
    n = prep.params.n
    gens = [follow(fleet, t, m) for t, m in zip(trackers, mtracks)]
    async for pi, updates in _merged(gens):
        choices = []
        for u in updates:
            if not (u.text or u.finish_reason or (want_lp and u.token_ids)):
                continue
            lp = completion_logprobs(tt, u.token_ids, u.logprobs, u.top_logprobs, u.text_offset) if want_lp else None
            choices.append(CompletionChoice(index=pi * n + u.index, text=u.text, logprobs=lp,
                                            finish_reason=u.finish_reason, stop_reason=u.stop_reason))
        if choices:
            yield _sse(CompletionStreamResponse(id=rid, created=created, model=prep.model, choices=choices))
    errors = [t.error for t in trackers if t.error]
    if errors:
        yield _sse_error(errors[0])
    if include_usage:
        yield _sse(CompletionStreamResponse(id=rid, created=created, model=prep.model, choices=[],
                                            usage=usage_of(trackers)))


@router.post("/v1/chat/completions", responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 fleet: FleetClient = Depends(get_fleet), tt: TokenText = Depends(get_token_text),
                                 metrics=Depends(get_metrics)):
    rid = new_id("chatcmpl")
    prep = await prepare_chat(fleet, body, rid)
    trackers = _trackers(fleet, prep, body.include_stop_str_in_output)
    mtracks = _start_metrics(metrics, prep)
    await _submit(fleet, prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _guarded_sse(_stream_chat(rid, prep, fleet, trackers[0], mtracks, tt, body.logprobs, include_usage),
                         fleet, rid, trackers, mtracks),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    if not await _collect_unless_disconnected(request, fleet, trackers, mtracks):
        _finish_metrics(mtracks, "abort")
        return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, status_code=499)
    _raise_on_error(trackers)
    return chat_response(rid, prep.model, trackers[0], tt, body.logprobs)


async def _stream_chat(rid, prep: Prepared, fleet, tracker: OutputTracker, mtracks, tt, want_lp, include_usage):
    created = int(time.time())
    first = [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
             for i in range(prep.params.n)]
    yield _sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=first))
    async for updates in follow(fleet, tracker, mtracks[0]):
        choices = []
        for u in updates:
            if not (u.text or u.finish_reason or (want_lp and u.token_ids)):
                continue
            lp = chat_logprobs(tt, u.token_ids, u.logprobs, u.top_logprobs) if want_lp else None
            choices.append(ChatStreamChoice(index=u.index, delta=DeltaMessage(content=u.text or None),
                                            logprobs=lp, finish_reason=u.finish_reason,
                                            stop_reason=u.stop_reason))
        if choices:
            yield _sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=choices))
    if tracker.error:
        yield _sse_error(tracker.error)
    if include_usage:
        yield _sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=[],
                                       usage=usage_of([tracker])))


@router.get("/v1/models", response_model=ModelList)
async def list_models(fleet: FleetClient = Depends(get_fleet)) -> ModelList:
    workers = [w for w in await fleet.live_workers() if fleet.serves(w.info.model)]
    return ModelList(data=[ModelCard(id=fleet.model.name, max_model_len=await fleet.max_model_len(),
                                     workers=len(workers))])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(fleet: FleetClient = Depends(get_fleet)):
    try:
        await asyncio.wait_for(fleet.redis.ping(), timeout=2.0)
    except Exception as e:
        return JSONResponse(HealthResponse(status="unavailable", redis=False, workers=0,
                                           detail=f"redis does not answer: {e}").model_dump(), status_code=503)
    workers = await fleet.live_workers(fresh=True)
    if not workers:
        return JSONResponse(HealthResponse(status="unavailable", redis=True, workers=0,
                                           detail="no worker registered").model_dump(), status_code=503)
    return HealthResponse(status="ok", redis=True, workers=len(workers))


# ------------------------------------------------------------------------------------------------
# jobs


def _job_view(raw: dict, result: dict | None = None) -> JobView:
    meta = JobMeta.model_validate_json(raw["meta"])
    res = result if result is not None else (json.loads(raw["result"]) if raw.get("result") else None)
    return JobView(
        id=meta.job_id, kind=meta.kind, model=meta.model, status=raw.get("status", "queued"),
        created_at=meta.created_at, updated_at=float(raw["updated_at"]) if raw.get("updated_at") else None,
        finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None, result=res,
        error=raw.get("error") or None,
    )


def _job_result(meta: JobMeta, tracker: OutputTracker, tt: TokenText) -> dict:
    created = int(meta.created_at)
    if meta.kind == "chat":
        resp = chat_response(meta.job_id, meta.model, tracker, tt, meta.want_logprobs, created)
    else:
        resp = completion_response(meta.job_id, meta.model, [tracker], tt, meta.want_logprobs, created)
    return resp.model_dump()


def _job_final_status(tracker: OutputTracker) -> tuple[JobStatus, str | None]:
    return final_job_status(tracker.error, [s.finish_reason for s in tracker.seqs]), tracker.error or None


async def run_job(fleet: FleetClient, meta: JobMeta, tt: TokenText) -> None:
    """Follow a job in the gateway that accepted it: stop strings abort it, the result is stored.
    If this gateway goes away, GET /v1/jobs/{id} assembles the result from the output stream instead."""
    tracker = OutputTracker(fleet.model.tokenizer, meta.request_id, meta.prompt_token_ids, meta.sampling,
                            meta.include_stop_str_in_output)
    try:
        async for delta in fleet.deltas(meta.request_id):
            tracker.apply(delta)
            if tracker.done:
                break
        status, error = _job_final_status(tracker)
        await fleet.store_job_result(meta.job_id, _job_result(meta, tracker, tt), meta.ttl_s)
        await fleet.set_job_status(meta.job_id, status, error)
        if tracker.needs_abort:
            tracker.abort_sent = True
            await fleet.abort(meta.request_id, "stop string")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the job keeps running in the scheduler; GET assembles its result later
        log.warning("job %s follower stopped: %s", meta.job_id, e)


async def assemble_job(fleet: FleetClient, raw: dict, tt: TokenText) -> dict | None:
    meta = JobMeta.model_validate_json(raw["meta"])
    tracker = OutputTracker(fleet.model.tokenizer, meta.request_id, meta.prompt_token_ids, meta.sampling,
                            meta.include_stop_str_in_output)
    seen = False
    async for delta in fleet.deltas(meta.request_id, block=False):
        seen = True
        tracker.apply(delta)
        if tracker.done:
            break
    if not seen:
        return None
    result = _job_result(meta, tracker, tt)
    if tracker.done:
        await fleet.store_job_result(meta.job_id, result, meta.ttl_s)
    return result


@router.post("/v1/jobs", status_code=202, response_model=JobView, responses=ERRORS)
async def create_job(request: Request, fleet: FleetClient = Depends(get_fleet)):
    try:
        body = await request.json()
    except Exception as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with `prompt` (completion) or `messages` (chat)")
    kind = body.pop("kind", None)
    if kind is None:
        kind = "chat" if "messages" in body else "completion"
    if kind not in ("completion", "chat"):
        raise BadRequest("kind: must be 'completion' or 'chat'", "kind")
    if body.get("stream"):
        raise BadRequest("stream: jobs do not stream; poll GET /v1/jobs/{id}", "stream")
    job_id = new_id("job")
    try:
        parsed = ChatCompletionRequest.model_validate(body) if kind == "chat" else CompletionRequest.model_validate(body)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise BadRequest(msg, param) from None
    if kind == "chat":
        prep = await prepare_chat(fleet, parsed, job_id)
        want_lp = bool(parsed.logprobs)
    else:
        if len(parsed.prompts()) != 1:
            raise BadRequest("prompt: a job takes a single prompt", "prompt")
        prep = await prepare_completion(fleet, parsed, job_id)
        want_lp = parsed.logprobs is not None
    ttl = fleet.settings.job_ttl_s
    meta = JobMeta(job_id=job_id, kind=kind, model=prep.model, body=body, request_id=job_id,
                     prompt_token_ids=prep.prompts[0], sampling=prep.params,
                     include_stop_str_in_output=parsed.include_stop_str_in_output, want_logprobs=want_lp,
                     created_at=time.time(), ttl_s=ttl)
    await fleet.create_job(meta)
    await _submit(fleet, prep, job_id=job_id)
    fleet.spawn(run_job(fleet, meta, request.app.state.token_text))
    raw = await fleet.get_job(job_id)
    return JSONResponse(_job_view(raw).model_dump(), status_code=202)


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(job_id: str, fleet: FleetClient = Depends(get_fleet), tt: TokenText = Depends(get_token_text)):
    raw = await fleet.get_job(job_id)
    if raw is None or "meta" not in raw:
        raise BadRequest(f"job {job_id!r} does not exist (or expired)", "job_id", 404, "job_not_found")
    result = None
    if not raw.get("result") and raw.get("status") in TERMINAL_JOB_STATUSES:
        result = await assemble_job(fleet, raw, tt)
    return _job_view(raw, result)


@router.delete("/v1/jobs/{job_id}", response_model=JobView, responses={**ERRORS, 409: {"model": ErrorResponse}})
async def cancel_job(job_id: str, fleet: FleetClient = Depends(get_fleet)):
    raw = await fleet.get_job(job_id)
    if raw is None or "meta" not in raw:
        raise BadRequest(f"job {job_id!r} does not exist (or expired)", "job_id", 404, "job_not_found")
    if raw.get("status") in TERMINAL_JOB_STATUSES:
        raise BadRequest(f"job {job_id!r} is already {raw['status']}", "job_id", 409, "job_finished")
    meta = JobMeta.model_validate_json(raw["meta"])
    await fleet.set_job_status(job_id, JobStatus.CANCELLED)
    await fleet.abort(meta.request_id, "cancelled by the user")
    return _job_view(await fleet.get_job(job_id))
