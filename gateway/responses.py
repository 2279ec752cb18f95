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
    PromptLogprob,
    TopLogprob,
    Usage,
)
from gateway import tools
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


def prompt_logprobs_view(tt: TokenText, plp: list[list[TokenLogprob] | None] | None):
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: logprob, rank, text}; the
    prompt's own token first, then the top ones (rank 1 = the most likely)."""
    if plp is None:
        return None
    out: list[dict[str, PromptLogprob] | None] = []
    for entry in plp:
        if entry is None:
            out.append(None)
            continue
        d: dict[str, PromptLogprob] = {}
        for rank, t in enumerate(entry):
            d.setdefault(str(t.token_id), PromptLogprob(logprob=t.logprob, rank=rank or None,
                                                        decoded_token=tt(t.token_id)))
        out.append(d)
    return out


def _echoed(tt: TokenText, t: RequestOutputProcessor, want_logprobs: bool) -> tuple[str, CompletionLogprobs | None]:
    """The prompt's text and, with logprobs, its tokens' logprobs (None for the first), as OpenAI's echo."""
    text = tt.tokenizer.decode(t.prompt_token_ids, skip_special_tokens=False) if tt.tokenizer else ""
    if not want_logprobs:
        return text, None
    plp = t.prompt_logprobs or [None] * len(t.prompt_token_ids)
    lps = [e[0].logprob if e else None for e in plp]
    tops = [e or [] for e in plp]
    lp = completion_logprobs(tt, t.prompt_token_ids, lps, tops, 0)
    lp.top_logprobs[0] = None
    return text, lp


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    end = (a.text_offset[-1] + len(a.tokens[-1])) if a.tokens else 0
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + [end + o for o in b.text_offset])


def completion_response(rid: str, model: str, trackers: list[RequestOutputProcessor], tt: TokenText,
                        want_logprobs: bool, created: int | None = None, prep=None) -> CompletionResponse:
    """``prep`` (a prepare.Prepared) brings echo, max_tokens 0 and best_of (the n best completions by
    cumulative logprob, in that order)."""
    choices = []
    n = prep.n if prep is not None else None
    for pi, t in enumerate(trackers):
        comps = t.completions
        if n is not None and n < len(comps):
            comps = sorted(comps, key=lambda c: -(c.cumulative_logprob or 0.0))[:n]
        head, head_lp = _echoed(tt, t, want_logprobs) if prep is not None and prep.echo else ("", None)
        plp = prompt_logprobs_view(tt, t.prompt_logprobs) if t.params.prompt_logprobs is not None else None
        for j, s in enumerate(comps):
            drop = prep is not None and prep.prompt_only
            ids = [] if drop else s.token_ids
            lp = completion_logprobs(tt, ids, s.logprobs, s.top_logprobs, 0) if want_logprobs else None
            if head_lp is not None:
                lp = _joined(head_lp, lp)
            choices.append(CompletionChoice(index=pi * (n or t.params.n) + (j if n is not None else s.index),
                                            text=head + ("" if drop else s.text), logprobs=lp,
                                            finish_reason="length" if drop else s.finish_reason,
                                            stop_reason=None if drop else s.stop_reason, prompt_logprobs=plp))
    return CompletionResponse(id=rid, model=model, choices=choices, usage=usage_of(trackers),
                              created=created or int(time.time()))


def chat_response(rid: str, model: str, tracker: RequestOutputProcessor, tt: TokenText, want_logprobs: bool,
                  created: int | None = None, tool_names: set[str] | None = None) -> ChatCompletionResponse:
    choices = []
    for s in tracker.completions:
        lp = chat_logprobs(tt, s.token_ids, s.logprobs, s.top_logprobs) if want_logprobs else None
        content, calls = tools.parse(s.text, tool_names) if tool_names else (s.text, [])
        finish = "tool_calls" if calls and s.finish_reason == "stop" else s.finish_reason
        choices.append(ChatChoice(index=s.index, message=AssistantMessage(content=content, tool_calls=calls or None),
                                  logprobs=lp, finish_reason=finish, stop_reason=s.stop_reason))
    return ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage_of([tracker]),
                                  created=created or int(time.time()))


def make_request(request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=params,
                             priority=priority, arrival_time=time.time())
