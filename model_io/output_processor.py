"""Turns a request's token deltas into completions: incremental detokenisation, exact stop strings,
logprobs and finish reasons. The one copy the offline engine and the gateway both use, off the
scheduler's hot loop, so the fleet's text equals the offline engine's token for token.

Detokenisation follows vLLM's prefix/read offsets so a multi-byte character split over tokens never
shows as U+FFFD, and the cost per token is O(1) instead of decoding the whole output each time. Text
that could still turn into a stop string is held back while streaming, so no client ever sees text
that is later cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol import FinishReason, SamplingParams, TokenLogprob
from model_io.tokenizer import Tokenizer

# Tokens of context decoded before the new ones, so merges and leading spaces come out right.
_CONTEXT_TOKENS = 5


@dataclass
class TextDelta:
    text: str
    stop_string: str | None = None  # set when a stop string ended the completion


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        context = self.prompt_token_ids[-_CONTEXT_TOKENS:]
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.output_token_ids: list[int] = []
        self.text = ""  # all text produced so far (after any stop-string cut)
        self._emitted = 0  # characters of self.text already returned to the caller
        self.stopped: str | None = None
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode_new(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text
        return ""

    def add_tokens(self, token_ids: list[int], finished: bool = False) -> TextDelta:
        """Feed new tokens; returns the text that may be shown now."""
        if self.stopped is not None:
            return TextDelta("", self.stopped)
        for tid in token_ids:
            self.output_token_ids.append(tid)
            start = max(0, len(self.text) - self._hold)
            self.text += self._decode_new(tid)
            if self.stop:
                hit = self._find_stop(start)
                if hit is not None:
                    idx, s = hit
                    self.text = self.text[: idx + len(s)] if self.include_stop_str_in_output else self.text[:idx]
                    self.stopped = s
                    break
        if self.stopped is not None or finished:
            end = len(self.text)
        else:
            end = max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return TextDelta(delta, self.stopped)

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best


# ------------------------------------------------------------------------------------------------
# one request's deltas -> its completions


@dataclass
class CompletionOutput:
    """One completion of a request as far as it got (the offline API returns these as they are)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # logprob of each generated token
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        return sum(self.logprobs) if self.logprobs is not None else None


@dataclass
class CompletionUpdate:
    """What changed for one completion in one delta (what a stream shows)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[TokenLogprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int  # characters of this completion before `text`


class RequestOutputProcessor:
    """Applies the scheduler's deltas of one request (`RequestOutputDelta`) to its completions.

    Without a tokenizer only token ids (and logprobs) are kept. A completion that ended on a stop
    string ignores the token or two the scheduler may still send; once every completion did,
    `needs_abort` tells the caller to abort the request so its blocks are freed.
    """

    def __init__(self, tokenizer: Tokenizer | None, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams, include_stop_str_in_output: bool = False):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.completions = [CompletionOutput(i) for i in range(params.n)]
        self._detoks = [
            IncrementalDetokenizer(tokenizer, prompt_token_ids, list(params.stop), params.skip_special_tokens,
                                   include_stop_str_in_output) if tokenizer is not None else None
            for _ in range(params.n)
        ]
        self.finished = False  # the scheduler finished the request
        self.error: str | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[list[TokenLogprob] | None] | None = None
        self.abort_sent = False

    @property
    def all_completions_finished(self) -> bool:
        return all(c.finished for c in self.completions)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def done(self) -> bool:
        """Nothing more to show: finished by the scheduler or every completion hit a stop string."""
        return self.finished or self.all_completions_finished

    @property
    def needs_abort(self) -> bool:
        """Every completion ended on a stop string but the scheduler still runs the request."""
        return self.all_completions_finished and not self.finished and not self.abort_sent

    def apply(self, delta: Any) -> list[CompletionUpdate]:
        """Apply one `RequestOutputDelta`; returns what changed, per completion."""
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = (self.prompt_logprobs or []) + list(delta.prompt_logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        updates = [u for sd in delta.outputs if (u := self._apply_completion(sd)) is not None]
        if delta.error:
            self.error = delta.error
        if delta.finished:
            self.finished = True
            updates += self._close_unfinished(bool(delta.error))
        return updates

    def _apply_completion(self, sd: Any) -> CompletionUpdate | None:
        if sd.index >= len(self.completions):
            return None
        comp = self.completions[sd.index]
        if comp.finished:
            return None  # ended by a stop string; the scheduler may still send a token or two
        offset = len(comp.text)
        new_ids = list(sd.token_ids)
        text = ""
        detok = self._detoks[sd.index]
        if detok is not None:
            before = len(detok.output_token_ids)
            td = detok.add_tokens(new_ids, finished=sd.finish_reason is not None)
            new_ids = detok.output_token_ids[before:]  # the tokens after a stop string are dropped
            text = td.text
            if td.stop_string is not None:
                comp.finish_reason, comp.stop_reason = FinishReason.STOP.value, td.stop_string
        kept = len(new_ids)
        comp.text += text
        comp.token_ids.extend(new_ids)
        lps = list(sd.logprobs[:kept]) if sd.logprobs is not None else None
        tops = list(sd.top_logprobs[:kept]) if sd.top_logprobs is not None else None
        if lps is not None:
            comp.logprobs = (comp.logprobs or []) + lps
        if tops is not None:
            comp.top_logprobs = (comp.top_logprobs or []) + tops
        if sd.finish_reason is not None and not comp.finished:
            comp.finish_reason = FinishReason(sd.finish_reason).value
            comp.stop_reason = sd.stop_reason
        if not (text or new_ids or comp.finished):
            return None
        return CompletionUpdate(comp.index, text, new_ids, lps, tops, comp.finish_reason, comp.stop_reason, offset)

    def _close_unfinished(self, failed: bool) -> list[CompletionUpdate]:
        """The request ended without a finish reason for some completions: show their held-back text."""
        updates = []
        for comp, detok in zip(self.completions, self._detoks):
            if comp.finished:
                continue
            offset = len(comp.text)
            tail = detok.add_tokens([], finished=True).text if detok is not None else ""
            comp.text += tail
            comp.finish_reason = FinishReason.ERROR.value if failed else FinishReason.ABORT.value
            updates.append(CompletionUpdate(comp.index, tail, [], None, None, comp.finish_reason, None, offset))
        return updates
