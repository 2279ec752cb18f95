"""OpenAI response bodies from a request's completions (`model_io.output_processor`, the same
processor the offline engine uses, so the fleet's text equals the offline engine's token for token)."""

from __future__ import annotations

import functools
import time
import uuid

from gateway.api_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from model_io.output_processor import RequestOutputProcessor
from protocol import GenerationRequest, SamplingParams, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# formatting


class TokenText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._one = functools.lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, tid: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def __call__(self, tid: int) -> str:
        return self._one(tid)


def completion_logprobs(tt: TokenText, token_ids: list[int], logprobs: list[float] | None,
                        tops: list[list[TokenLogprob]] | None, text_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    off = text_offset
    for i, tid in enumerate(token_ids):
        s = tt(tid)
        out.tokens.append(s)
        out.token_logprobs.append(logprobs[i] if logprobs is not None and i < len(logprobs) else None)
        if tops is not None and i < len(tops):
            d: dict[str, float] = {}
            for t in tops[i]:
                d.setdefault(tt(t.token_id), t.logprob)
            out.top_logprobs.append(d)
        else:
            out.top_logprobs.append(None)
        out.text_offset.append(off)
        off += len(s)
    return out


def chat_logprobs(tt: TokenText, token_ids: list[int], logprobs: list[float] | None,
                  tops: list[list[TokenLogprob]] | None) -> ChatLogprobs:
    content = []
    for i, tid in enumerate(token_ids):
        s = tt(tid)
        top = []
        if tops is not None and i < len(tops):
            top = [TopLogprob(token=tt(t.token_id), logprob=t.logprob, bytes=list(tt(t.token_id).encode()))
                   for t in tops[i]]
        lp = logprobs[i] if logprobs is not None and i < len(logprobs) else 0.0
        content.append(ChatTokenLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def usage_of(trackers: list[RequestOutputProcessor]) -> Usage:
    p = sum(len(t.prompt_token_ids) for t in trackers)
    c = sum(t.completion_tokens for t in trackers)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def completion_response(rid: str, model: str, trackers: list[RequestOutputProcessor], tt: TokenText,
                        want_logprobs: bool, created: int | None = None) -> CompletionResponse:
    choices = []
    for pi, t in enumerate(trackers):
        for s in t.completions:
            lp = completion_logprobs(tt, s.token_ids, s.logprobs, s.top_logprobs, 0) if want_logprobs else None
            choices.append(CompletionChoice(index=pi * t.params.n + s.index, text=s.text, logprobs=lp,
                                            finish_reason=s.finish_reason, stop_reason=s.stop_reason))
    return CompletionResponse(id=rid, model=model, choices=choices, usage=usage_of(trackers),
                              created=created or int(time.time()))


def chat_response(rid: str, model: str, tracker: RequestOutputProcessor, tt: TokenText, want_logprobs: bool,
                  created: int | None = None) -> ChatCompletionResponse:
    choices = []
    for s in tracker.completions:
        lp = chat_logprobs(tt, s.token_ids, s.logprobs, s.top_logprobs) if want_logprobs else None
        choices.append(ChatChoice(index=s.index, message=AssistantMessage(content=s.text), logprobs=lp,
                                  finish_reason=s.finish_reason, stop_reason=s.stop_reason))
    return ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage_of([tracker]),
                                  created=created or int(time.time()))


def make_request(request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=params,
                             priority=priority, arrival_time=time.time())
