"""Pydantic models of every request and response of the gateway's HTTP API (OpenAI-compatible).

Requests reject unknown fields (extra="forbid") so a typo or an unsupported OpenAI feature is a 400
that names the field, never a silently ignored option; they are strict (`"stream": "yes"` or
`"max_tokens": "16"` is a 400, never coerced), every string must be valid Unicode (a lone surrogate
such as "\ud800" is a 400), and the API's own limits (the `MAX_*` below, docs/api_limits.md) are Field
constraints, so the OpenAPI schema carries them. Range checks of the sampling fields live in
`protocol.SamplingParams`, which the routes build from these models.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

API_VERSION = 1

# The API's limits (docs/api_limits.md).
MAX_PROMPTS_PER_REQUEST = 64  # prompts of one /v1/completions request
MAX_N = 16  # completions per prompt (and best_of)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # `logprobs` of /v1/completions, `top_logprobs` of chat (as protocol.SamplingParams)
MAX_MESSAGES = 1024  # messages of one chat request


def _valid_unicode(s: str) -> str:
    # A lone surrogate ("\ud800" in JSON) is a str to Python but no text: the tokenizer and the Redis
    # encoder would fail on it later, so it is a 400 here.
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("invalid_unicode", "invalid Unicode (a lone surrogate); text must be valid "
                                      "UTF-8") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[Text, Field(max_length=MAX_STOP_STRING_CHARS)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Resp(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------
# requests


class StreamOptions(_Req):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Req):
    name: Text = Field(max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Req):
    """vLLM's current `structured_outputs` object: exactly one of its constraints."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1)
    grammar: Text | None = None
    json_object: bool | None = None


# OpenAI fields accepted and ignored: they change nothing a model server computes (docs/api_limits.md).
IGNORED_FIELDS = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "user")


class _SamplingFields(_Req):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names; vLLM's extras)."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
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
    logit_bias: dict[Text, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM: logprobs of the prompt")
    # structured outputs: OpenAI's response_format; vLLM's guided_* and structured_outputs (one at most)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    guided_grammar: Text | None = None
    structured_outputs: StructuredOutputsField | None = None
    # accepted and ignored (IGNORED_FIELDS)
    user: Text | None = None
    metadata: dict[str, Text] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None


class CompletionRequest(_SamplingFields):
    prompt: (Text | list[TokenId] | Annotated[list[Text], Field(max_length=MAX_PROMPTS_PER_REQUEST)]
             | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS_PER_REQUEST)]) = Field(
        description=f"a text, a list of token ids, or a list of at most {MAX_PROMPTS_PER_REQUEST} of either")
    max_tokens: int | None = Field(16, ge=0, description="prompt + max_tokens must fit the model's context; "
                                                           "0 only with echo (the prompt's logprobs alone)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

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
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(_Req):
    name: Text = Field(max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Req):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Req):
    name: Text


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the model's context")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's new name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted without tools (OpenAI does)


def _not_in_jobs(v, info):
    if v:
        raise ValueError(f"{info.field_name} is not supported in jobs (use the OpenAI routes)")
    return v


class JobCompletionRequest(CompletionRequest):
    """POST /v1/jobs with a completion body (one prompt; jobs do not stream: poll GET /v1/jobs/{id})."""

    kind: Literal["completion"] | None = None
    stream: Literal[False] = False
    _no_echo = field_validator("echo", "best_of")(_not_in_jobs)


class JobChatRequest(ChatCompletionRequest):
    """POST /v1/jobs with a chat body (jobs do not stream: poll GET /v1/jobs/{id})."""

    kind: Literal["chat"] | None = None
    stream: Literal[False] = False
    _no_tools = field_validator("tools")(_not_in_jobs)


def _job_kind(body: Any) -> str | None:
    if isinstance(body, BaseModel):
        return "chat" if isinstance(body, JobChatRequest) else "completion"
    if not isinstance(body, dict):
        return None
    kind = body.get("kind")
    if kind is None:
        return "chat" if "messages" in body else "completion"
    return kind if kind in ("completion", "chat") else None


# A completion body or a chat body, told apart by `kind` or else by `messages`.
JobRequest = Annotated[
    Union[Annotated[JobCompletionRequest, Tag("completion")], Annotated[JobChatRequest, Tag("chat")]],
    Discriminator(_job_kind, custom_error_type="job_body",
                  custom_error_message="the body must be a JSON object: a completion (`prompt`) or a chat "
                                       "(`messages`); `kind`, when given, is 'completion' or 'chat'"),
]


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


class PromptLogprob(_Resp):
    """vLLM's entry of `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


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


class FunctionCall(_Resp):
    name: str
    arguments: str


class ToolCall(_Resp):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


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


class DeltaFunctionCall(_Resp):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Resp):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Resp):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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


class TokenizeCompletion(_Req):
    """vLLM's POST /tokenize with a prompt."""

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True


class TokenizeChat(_Req):
    """vLLM's POST /tokenize with messages (the chat template applied)."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    tools: list[ToolDef] | None = None


class TokenizeResponse(_Resp):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Req):
    model: Text | None = None
    tokens: list[TokenId] = Field(max_length=1_000_000)


class DetokenizeResponse(_Resp):
    prompt: str


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
    status: Literal["ok", "degraded", "unavailable"]  # unavailable: Redis does not answer
    redis: bool
    scheduler: bool = False  # the scheduler service holds its lease
    workers: int
    missing: list[Literal["redis", "scheduler", "workers"]] = Field(default_factory=list)
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
