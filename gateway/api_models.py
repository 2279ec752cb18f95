"""Pydantic models of every request and response of the gateway's HTTP API (OpenAI-compatible).

Requests reject unknown fields (extra="forbid") so a typo or an unsupported OpenAI feature is a 400
that names the field, never a silently ignored option. Range checks of the sampling fields live in
`protocol.SamplingParams`, which the routes build from these models.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_VERSION = 1


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Resp(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------
# requests


class StreamOptions(_Req):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Req):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names; vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, str):
            if v == "":
                raise ValueError("prompt must not be empty")
        elif len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        elif isinstance(v[0], (list, str)) and any(len(p) == 0 for p in v):
            raise ValueError("prompt: every prompt must be non-empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class JobRequest(_Req):
    """POST /v1/jobs: a completion body or a chat body (told apart by `prompt` / `messages`)."""

    kind: Literal["completion", "chat"] | None = None


# ------------------------------------------------------------------------------------------------
# responses


class Usage(_Resp):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Resp):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    pass


class TopLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Resp):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Resp):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class DeltaMessage(_Resp):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Resp):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Resp):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "pagedfleet"
    max_model_len: int | None = None
    workers: int = 0


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Resp):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Resp):
    error: ErrorBody


class HealthResponse(_Resp):
    status: Literal["ok", "unavailable"]
    redis: bool
    workers: int
    detail: str | None = None


class JobView(_Resp):
    version: int = API_VERSION
    id: str
    object: Literal["job"] = "job"
    kind: Literal["completion", "chat"]
    model: str
    status: Literal["queued", "running", "preempted", "completed", "failed", "cancelled"]
    created_at: float
    updated_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
