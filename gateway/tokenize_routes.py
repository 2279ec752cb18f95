"""vLLM's POST /tokenize and POST /detokenize: a prompt (or chat messages through the chat template) to
token ids and back, with the model's context length (what clients use to budget their prompts)."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter

from gateway.api_models import DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeChat, \
    TokenizeCompletion, TokenizeResponse
from gateway.deps import Fleet, JsonBody
from gateway.errors import BadRequest
from gateway.prepare import chat_messages, check_model, render_chat

router = APIRouter()
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 415)}


def _tok(fleet):
    tok = fleet.model.tokenizer
    if tok is None:
        raise BadRequest("this model has no tokenizer", None)
    return tok


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, dependencies=[JsonBody])
async def tokenize(body: TokenizeCompletion | TokenizeChat, fleet: Fleet) -> TokenizeResponse:
    check_model(fleet, body.model)
    tok = _tok(fleet)
    if isinstance(body, TokenizeChat):
        text = await render_chat(tok, chat_messages(body.messages), body.add_generation_prompt, body.tools)
        ids = await to_thread.run_sync(lambda: tok.encode(text, add_special_tokens=body.add_special_tokens))
    else:
        ids = await to_thread.run_sync(lambda: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    return TokenizeResponse(count=len(ids), max_model_len=await fleet.max_model_len(), tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, dependencies=[JsonBody])
async def detokenize(body: DetokenizeRequest, fleet: Fleet) -> DetokenizeResponse:
    check_model(fleet, body.model)
    tok = _tok(fleet)
    vocab = await fleet.vocab_size()
    if vocab is not None and body.tokens and max(body.tokens) >= vocab:
        raise BadRequest(f"tokens: token ids must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=await to_thread.run_sync(lambda: tok.decode(body.tokens, skip_special_tokens=False)))
