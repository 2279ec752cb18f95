"""From API bodies to GenerationRequests, and from RequestOutputDeltas back to OpenAI responses.

`OutputTracker` applies the scheduler's token deltas of one request exactly as the offline engine does
(`pagedfleet.engine.LLMEngine._apply_delta`): incremental detokenisation and exact stop strings through
`model_io.output_processor`, so the fleet's text equals the offline engine's token for token.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.api_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from protocol import FinishReason, GenerationRequest, RequestOutputDelta, SamplingParams, TokenLogprob


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status_code: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


def validation_message(e: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    parts = []
    first_loc = None
    unions: dict[str, list[str]] = {}
    for err in e.errors():
        loc_t = [x for x in err.get("loc", ()) if x != "body"]
        if len(loc_t) >= 2 and _is_union_tag(loc_t[1]):
            # one error per member of a union type: say once what was expected
            unions.setdefault(str(loc_t[0]), []).append(str(loc_t[1]))
            continue
        loc = ".".join(str(x) for x in loc_t)
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        if first_loc is None:
            first_loc = loc or None
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    for name, tags in unions.items():
        parts.append(f"{prefix}{name}: wrong type; expected one of {' | '.join(dict.fromkeys(tags))}")
        first_loc = first_loc or f"{prefix}{name}"
    return "; ".join(parts) or str(e), first_loc


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# API body -> SamplingParams


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    kw: dict = {"n": body.n, "max_tokens": max_tokens, "ignore_eos": body.ignore_eos,
                "skip_special_tokens": body.skip_special_tokens}
    for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens"):
        v = getattr(body, name)
        if v is not None:
            kw[name] = v
    if body.top_k is not None:
        kw["top_k"] = body.top_k
    if body.stop is not None:
        kw["stop"] = body.stop
    if body.stop_token_ids:
        kw["stop_token_ids"] = body.stop_token_ids
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            kw["logprobs"] = body.logprobs
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequest("best_of: only best_of == n is supported", "best_of")
    else:
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs: requires logprobs to be true", "top_logprobs")
        if body.logprobs:
            kw["logprobs"] = body.top_logprobs or 0
    try:
        return SamplingParams(**kw)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise BadRequest(msg, param) from None


# ------------------------------------------------------------------------------------------------
# deltas -> completions


@dataclass
class SeqState:
    index: int
    detok: object | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ChoiceUpdate:
    """What changed for one completion in one delta (for streaming)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[TokenLogprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int  # characters of this completion before `text`


class OutputTracker:
    def __init__(self, tokenizer, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 include_stop_str_in_output: bool = False):
        from model_io.output_processor import IncrementalDetokenizer

        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = [
            SeqState(i, IncrementalDetokenizer(tokenizer, prompt_token_ids, list(params.stop),
                                               params.skip_special_tokens, include_stop_str_in_output)
                     if tokenizer is not None else None)
            for i in range(params.n)
        ]
        self.finished = False  # the scheduler finished the request
        self.error: str | None = None
        self.num_cached_tokens = 0
        self.abort_sent = False

    @property
    def all_seqs_finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def apply(self, delta: RequestOutputDelta) -> list[ChoiceUpdate]:
        updates: list[ChoiceUpdate] = []
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        for sd in delta.outputs:
            if sd.index >= len(self.seqs):
                continue
            seq = self.seqs[sd.index]
            if seq.finished:
                continue  # ended by a stop string; the scheduler may still send a token or two
            offset = len(seq.text)
            new_ids = list(sd.token_ids)
            text = ""
            if seq.detok is not None:
                before = len(seq.detok.output_token_ids)
                td = seq.detok.add_tokens(new_ids, finished=sd.finish_reason is not None)
                new_ids = seq.detok.output_token_ids[before:]
                text = td.text
                if td.stop_string is not None:
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP.value, td.stop_string
            kept = len(new_ids)
            seq.text += text
            seq.token_ids.extend(new_ids)
            lps = list(sd.logprobs[:kept]) if sd.logprobs is not None else None
            tops = list(sd.top_logprobs[:kept]) if sd.top_logprobs is not None else None
            if lps is not None:
                seq.logprobs = (seq.logprobs or []) + lps
            if tops is not None:
                seq.top_logprobs = (seq.top_logprobs or []) + tops
            if sd.finish_reason is not None and not seq.finished:
                seq.finish_reason = FinishReason(sd.finish_reason).value
                seq.stop_reason = sd.stop_reason
            if text or new_ids or seq.finished:
                updates.append(ChoiceUpdate(seq.index, text, new_ids, lps, tops, seq.finish_reason,
                                            seq.stop_reason, offset))
        if delta.error:
            self.error = delta.error
        if delta.finished:
            self.finished = True
            for seq in self.seqs:
                if not seq.finished:
                    offset = len(seq.text)
                    tail = seq.detok.add_tokens([], finished=True).text if seq.detok is not None else ""
                    seq.text += tail
                    seq.finish_reason = FinishReason.ERROR.value if delta.error else FinishReason.ABORT.value
                    updates.append(ChoiceUpdate(seq.index, tail, [], None, None, seq.finish_reason, None, offset))
        return updates

    @property
    def done(self) -> bool:
        """Nothing more to show: finished by the scheduler or every completion hit a stop string."""
        return self.finished or self.all_seqs_finished

    @property
    def needs_abort(self) -> bool:
        """Every completion ended on a stop string but the scheduler still runs the request."""
        return self.all_seqs_finished and not self.finished and not self.abort_sent


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


def usage_of(trackers: list[OutputTracker]) -> Usage:
    p = sum(len(t.prompt_token_ids) for t in trackers)
    c = sum(t.completion_tokens for t in trackers)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def completion_response(rid: str, model: str, trackers: list[OutputTracker], tt: TokenText,
                        want_logprobs: bool, created: int | None = None) -> CompletionResponse:
    choices = []
    for pi, t in enumerate(trackers):
        for s in t.seqs:
            lp = completion_logprobs(tt, s.token_ids, s.logprobs, s.top_logprobs, 0) if want_logprobs else None
            choices.append(CompletionChoice(index=pi * t.params.n + s.index, text=s.text, logprobs=lp,
                                            finish_reason=s.finish_reason, stop_reason=s.stop_reason))
    return CompletionResponse(id=rid, model=model, choices=choices, usage=usage_of(trackers),
                              created=created or int(time.time()))


def chat_response(rid: str, model: str, tracker: OutputTracker, tt: TokenText, want_logprobs: bool,
                  created: int | None = None) -> ChatCompletionResponse:
    choices = []
    for s in tracker.seqs:
        lp = chat_logprobs(tt, s.token_ids, s.logprobs, s.top_logprobs) if want_logprobs else None
        choices.append(ChatChoice(index=s.index, message=AssistantMessage(content=s.text), logprobs=lp,
                                  finish_reason=s.finish_reason, stop_reason=s.stop_reason))
    return ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage_of([tracker]),
                                  created=created or int(time.time()))


def make_request(request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=params,
                             priority=priority, arrival_time=time.time())
