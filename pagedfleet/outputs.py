"""What the offline API returns: one RequestOutput per prompt, one CompletionOutput per completion
(CompletionOutput is the output processor's own record, `model_io.output_processor`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_io.output_processor import CompletionOutput
from protocol import TokenLogprob

__all__ = ["CompletionOutput", "RequestOutput"]


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
