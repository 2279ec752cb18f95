"""Server-sent events of /v1/completions and /v1/chat/completions with `stream: true`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from gateway.api_models import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionStreamResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
)
from gateway import tools
from gateway.fleet import FleetClient, FleetError
from gateway.follow import abort_unfinished, finish_metrics, follow, merged
from gateway.prepare import Prepared
from gateway.responses import TokenText, chat_logprobs, completion_logprobs, usage_of
from model_io.output_processor import RequestOutputProcessor

log = logging.getLogger("pagedfleet.gateway")

# The 200 of a streaming route is JSON or an event stream; the OpenAPI schema says both.
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def sse(obj) -> str:
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


def sse_error(message: str, code: int = 500) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def event_stream(events: AsyncIterator[str], fleet: FleetClient, rid: str, procs: list[RequestOutputProcessor],
                 mtracks: list) -> StreamingResponse:
    return StreamingResponse(_guarded(events, fleet, rid, procs, mtracks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guarded(events: AsyncIterator[str], fleet: FleetClient, rid: str, procs: list[RequestOutputProcessor],
                   mtracks: list) -> AsyncIterator[str]:
    """Every SSE stream ends with [DONE]; a failure becomes an error event instead of a cut stream; and
    whatever still runs when the client goes away (or on an error) is aborted, so its blocks are freed."""
    try:
        async for chunk in events:
            yield chunk
        yield "data: [DONE]\n\n"
    except FleetError as e:
        yield sse_error(str(e), e.status_code)
        yield "data: [DONE]\n\n"
    except Exception as e:  # Redis went away, ...: tell the client instead of cutting the stream
        log.exception("stream %s failed", rid)
        yield sse_error(f"internal error: {type(e).__name__}: {e}")
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
        abort_unfinished(fleet, [p for p in procs if not p.done], "client disconnected")
        finish_metrics(mtracks, "abort")


async def completion_events(rid: str, prep: Prepared, fleet: FleetClient, procs: list[RequestOutputProcessor],
                            mtracks: list, tt: TokenText, want_lp: bool, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    n = prep.params.n
    gens = [follow(fleet, p, m) for p, m in zip(procs, mtracks)]
    async for pi, updates in merged(gens):
        choices = []
        for u in updates:
            if not (u.text or u.finish_reason or (want_lp and u.token_ids)):
                continue
            lp = completion_logprobs(tt, u.token_ids, u.logprobs, u.top_logprobs, u.text_offset) if want_lp else None
            choices.append(CompletionChoice(index=pi * n + u.index, text=u.text, logprobs=lp,
                                            finish_reason=u.finish_reason, stop_reason=u.stop_reason))
        if choices:
            yield sse(CompletionStreamResponse(id=rid, created=created, model=prep.model, choices=choices))
    errors = [p.error for p in procs if p.error]
    if errors:
        yield sse_error(errors[0])
    if include_usage:
        yield sse(CompletionStreamResponse(id=rid, created=created, model=prep.model, choices=[],
                                           usage=usage_of(procs)))


async def _content_events(rid: str, created: int, prep: Prepared, fleet: FleetClient, proc: RequestOutputProcessor,
                          mtracks: list, tt: TokenText, want_lp: bool) -> AsyncIterator[str]:
    async for updates in follow(fleet, proc, mtracks[0]):
        choices = []
        for u in updates:
            if not (u.text or u.finish_reason or (want_lp and u.token_ids)):
                continue
            lp = chat_logprobs(tt, u.token_ids, u.logprobs, u.top_logprobs) if want_lp else None
            choices.append(ChatStreamChoice(index=u.index, delta=DeltaMessage(content=u.text or None),
                                            logprobs=lp, finish_reason=u.finish_reason,
                                            stop_reason=u.stop_reason))
        if choices:
            yield sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=choices))


async def _tool_events(rid: str, created: int, prep: Prepared, fleet: FleetClient, proc: RequestOutputProcessor,
                       mtracks: list) -> AsyncIterator[str]:
    """With tools, a choice's text is held until it ends: then it goes out as tool-call deltas (id, name,
    arguments), finish_reason tool_calls, or else as one content delta."""
    texts: dict[int, str] = {}
    async for updates in follow(fleet, proc, mtracks[0]):
        for u in updates:
            texts[u.index] = texts.get(u.index, "") + u.text
            if not u.finish_reason:
                continue
            content, calls = tools.parse(texts[u.index], prep.tool_names)
            if calls:
                delta = DeltaMessage(tool_calls=[DeltaToolCall(index=k, id=c.id, type="function",
                                                               function=DeltaFunctionCall(name=c.function.name,
                                                                                          arguments=c.function.arguments))
                                                 for k, c in enumerate(calls)], content=content)
            else:
                delta = DeltaMessage(content=content)
            finish = "tool_calls" if calls and u.finish_reason == "stop" else u.finish_reason
            yield sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=[
                ChatStreamChoice(index=u.index, delta=delta, finish_reason=finish, stop_reason=u.stop_reason)]))


async def chat_events(rid: str, prep: Prepared, fleet: FleetClient, proc: RequestOutputProcessor, mtracks: list,
                      tt: TokenText, want_lp: bool, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    first = [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
             for i in range(prep.params.n)]
    yield sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=first))
    events = (_tool_events(rid, created, prep, fleet, proc, mtracks) if prep.tool_names
              else _content_events(rid, created, prep, fleet, proc, mtracks, tt, want_lp))
    async for chunk in events:
        yield chunk
    if proc.error:
        yield sse_error(proc.error)
    if include_usage:
        yield sse(ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=[],
                                      usage=usage_of([proc])))
