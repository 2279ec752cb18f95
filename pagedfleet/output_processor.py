"""Turns token deltas into text deltas: incremental detokenisation and exact stop strings.

Used by the offline engine and by the gateway, off the scheduler's hot loop. Detokenisation follows
vLLM's prefix/read offsets so a multi-byte character split over tokens never shows as U+FFFD, and the
cost per token is O(1) instead of decoding the whole output each time. Text that could still turn
into a stop string is held back while streaming, so no client ever sees text that is later cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedfleet.tokenizer import Tokenizer

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
