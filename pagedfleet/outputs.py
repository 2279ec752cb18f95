"""What the offline API returns: one RequestOutput per prompt, one CompletionOutput per completion."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import TokenLogprob


@dataclass
class CompletionOutput:
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
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None
    num_cached_tokens: int = 0
    finished: bool = False
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None

    def to_json_lines(self) -> list[dict]:
        return [
            {
                "request_id": self.request_id,
                "index": c.index,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
            }
            for c in self.outputs
        ]
