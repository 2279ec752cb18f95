"""API bodies -> checked token ids and SamplingParams, ready to submit to the fleet.

Tokenising runs in a worker thread (anyio.to_thread), so one huge prompt never stalls the event loop:
other requests and /health go on meanwhile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from anyio import to_thread
from pydantic import ValidationError

from gateway import rate_limit
from gateway.api_models import ChatCompletionRequest, CompletionRequest
from gateway.auth import CALLER, record_request_owners
from gateway.errors import BadRequest, validation_message
from gateway import structured, tools
from gateway.fleet import FleetClient
from gateway.responses import make_request
from model_io.output_processor import RequestOutputProcessor
from protocol import SamplingParams


@dataclass
class Prepared:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    model: str
    priority: int
    n: int = 0  # completions returned per prompt (fewer than params.n with best_of: the best n)
    echo: bool = False  # the prompt's text (and with logprobs its tokens' logprobs) lead each choice
    prompt_only: bool = False  # max_tokens 0 with echo: the one generated token is dropped
    tool_names: set[str] | None = None  # tools offered (the output is parsed into tool_calls)

    def __post_init__(self) -> None:
        self.n = self.n or self.params.n


def _logit_bias(bias: dict[str, float], vocab: int | None) -> dict[int, float]:
    out = {}
    for k, v in bias.items():
        if not k.isdigit() or (vocab is not None and int(k) >= vocab):
            raise BadRequest(f"logit_bias: {k!r} is not a token id of this model (0 .. {vocab})", "logit_bias")
        out[int(k)] = v
    return out


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                    constraint=None, vocab: int | None = None) -> SamplingParams:
    kw: dict = {"n": body.n, "max_tokens": max_tokens, "ignore_eos": body.ignore_eos,
                "skip_special_tokens": body.skip_special_tokens}
    if constraint is not None:
        kw["structured_output"] = constraint
    if body.logit_bias:
        kw["logit_bias"] = _logit_bias(body.logit_bias, vocab)
    if body.prompt_logprobs is not None:
        kw["prompt_logprobs"] = body.prompt_logprobs
    for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "top_k", "stop"):
        v = getattr(body, name)
        if v is not None:
            kw[name] = v
    if body.stop_token_ids:
        kw["stop_token_ids"] = body.stop_token_ids
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            kw["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:  # the prompt's logprobs, as many top ones as the output's
            kw["prompt_logprobs"] = max(body.prompt_logprobs or 0, body.logprobs)
        if body.best_of is not None and body.best_of < body.n:
            raise BadRequest(f"best_of ({body.best_of}) must be >= n ({body.n})", "best_of")
        if body.best_of is not None and body.best_of > body.n:
            if body.stream:
                raise BadRequest("best_of: cannot be used with stream (the best are known at the end)", "best_of")
            kw["n"] = body.best_of
            kw.setdefault("logprobs", 0)  # the cumulative logprob ranks them
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


def check_model(fleet: FleetClient, name: str | None) -> str:
    if not fleet.serves(name):
        raise BadRequest(
            f"model: {name!r} does not exist here; this fleet serves {fleet.model.name!r}", "model", 404,
            "model_not_found",
        )
    return fleet.model.name


async def check_prompt(fleet: FleetClient, ids: list[int], max_tokens: int | None, what: str = "prompt") -> None:
    """The prompt's ids are in the vocabulary and prompt + max_tokens fits the context."""
    if not ids:
        raise BadRequest(f"{what}: must not be empty", what)
    vocab = await fleet.vocab_size()
    if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
        raise BadRequest(f"{what}: token ids must be in [0, {vocab})", what)
    max_len = await fleet.max_model_len()
    if len(ids) >= max_len:
        raise BadRequest(
            f"{what}: {len(ids)} tokens do not fit the model's context of {max_len} tokens", what,
            code="context_length_exceeded",
        )
    if max_tokens is not None and len(ids) + max_tokens > max_len:
        raise BadRequest(
            f"max_tokens: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
            f"{max_len} tokens (at most {max_len - len(ids)} here)", "max_tokens", code="context_length_exceeded",
        )


def _tokenizer(fleet: FleetClient):
    tok = fleet.model.tokenizer
    if tok is None:
        raise BadRequest("this model has no tokenizer: pass prompts as token ids", "prompt")
    return tok


async def constraint_of(fleet: FleetClient, body: CompletionRequest | ChatCompletionRequest):
    """The request's structured-output constraint, compiled once (a 400 when it does not compile)."""
    found = structured.requested(body)
    if found is None:
        return None
    await structured.check(fleet, *found)
    return found[1]


async def prepare_completion(fleet: FleetClient, body: CompletionRequest, base_id: str) -> Prepared:
    model = check_model(fleet, body.model)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    if max_tokens == 0 and not body.echo:
        raise BadRequest("max_tokens: must be >= 1 (0 only with echo)", "max_tokens")
    if body.echo and body.stream:
        raise BadRequest("echo: not supported with stream", "echo")
    prompt_only = max_tokens == 0
    max_tokens = max(1, max_tokens)
    params = sampling_params(body, max_tokens, await constraint_of(fleet, body), await fleet.vocab_size())
    prompts = []
    for p in body.prompts():
        ids = list(p) if isinstance(p, list) else await to_thread.run_sync(_tokenizer(fleet).encode, p)
        await check_prompt(fleet, ids, max_tokens)
        prompts.append(ids)
    rids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    return await _charged(fleet, Prepared(rids, prompts, params, model, body.priority, n=body.n, echo=body.echo,
                                          prompt_only=prompt_only))


async def prepare_chat(fleet: FleetClient, body: ChatCompletionRequest, base_id: str) -> Prepared:
    model = check_model(fleet, body.model)
    tok = _tokenizer(fleet)
    use_tools = tools.active(body)
    text = await render_chat(tok, chat_messages(body.messages), body.add_generation_prompt,
                             body.tools if use_tools else None)
    ids = await to_thread.run_sync(lambda: tok.encode(text, add_special_tokens=False))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    await check_prompt(fleet, ids, max_tokens, "messages")
    if max_tokens is None:
        max_tokens = max(1, await fleet.max_model_len() - len(ids))
    constraint = await constraint_of(fleet, body)
    forced = tools.constraint(body) if use_tools else None
    if forced is not None:
        if constraint is not None:
            raise BadRequest("tool_choice: a required or named tool does not combine with response_format",
                             "tool_choice")
        await structured.check(fleet, "tools", forced)
        constraint = forced
    params = sampling_params(body, max_tokens, constraint, await fleet.vocab_size())
    prep = Prepared([base_id], [ids], params, model, body.priority,
                    tool_names={t.function.name for t in body.tools} if use_tools else None)
    return await _charged(fleet, prep)


async def _charged(fleet: FleetClient, prep: Prepared) -> Prepared:
    """The token-rate limit: the request's prompt tokens + max_tokens x n, charged to the caller's key."""
    tokens = sum(len(p) for p in prep.prompts) + prep.params.max_tokens * prep.params.n * len(prep.prompts)
    await rate_limit.charge_tokens(fleet.redis, fleet.settings, CALLER.get(), tokens)
    return prep


def chat_messages(messages) -> list[dict]:
    """The messages as transformers passes them to a chat template: tool calls with their arguments parsed
    (templates render them with tojson, as vLLM passes them), tool results with their tool_call_id."""
    out = []
    for m in messages:
        d: dict = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise BadRequest("messages: a tool call's function.arguments must be JSON text", "messages") from None


async def render_chat(tok, messages: list[dict], add_generation_prompt: bool, tool_defs=None) -> str:
    """The chat template's text; with tools, passed as transformers passes them (``tools=``), or written in
    the messages when the template knows no tools (gateway/tools.py)."""
    kw = {}
    if tool_defs:
        defs = [t.model_dump(exclude_none=True) for t in tool_defs]
        if tools.template_knows_tools(tok.chat_template):
            kw["tools"] = defs
        else:
            messages = tools.hermes_messages(messages, defs)
    try:
        return await to_thread.run_sync(lambda: tok.apply_chat_template(messages, add_generation_prompt, **kw))
    except Exception as e:  # template errors (raise_exception in the template) name the problem
        raise BadRequest(f"messages: {e}", "messages") from None


def processors(fleet: FleetClient, prep: Prepared, include_stop: bool) -> list[RequestOutputProcessor]:
    return [RequestOutputProcessor(fleet.model.tokenizer, rid, ids, prep.params, include_stop)
            for rid, ids in zip(prep.request_ids, prep.prompts)]


async def submit(fleet: FleetClient, prep: Prepared) -> None:
    """Put an interactive request's sequences on the requests stream (a job's goes with its record:
    FleetClient.create_job)."""
    await record_request_owners(fleet.redis, fleet.settings.job_ttl_s, CALLER.get(), prep.request_ids)
    for rid, ids in zip(prep.request_ids, prep.prompts):
        await fleet.submit(make_request(rid, ids, prep.params, prep.priority))
