"""Structured-output fields of a request -> one `protocol.StructuredOutput`, checked before it is queued.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`: `strict` or not, the schema is always
enforced) and vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and
`structured_outputs` name the same thing; a request gives one at most. The spec is compiled here once (in
a thread, cached: model_io/grammar.py) so a malformed schema, regex or grammar is a 400 that says what is
wrong, never a worker error; the worker's compile of the same spec then cannot fail.
"""

from __future__ import annotations

import functools
import json

from anyio import to_thread

from gateway.api_models import ChatCompletionRequest, CompletionRequest
from gateway.errors import BadRequest
from gateway.fleet import FleetClient
from model_io.grammar import GrammarCompiler
from protocol import StructuredOutput

JSON_OBJECT = StructuredOutput.of_json_schema({"type": "object"})


def requested(body: CompletionRequest | ChatCompletionRequest) -> tuple[str, StructuredOutput] | None:
    """The request's constraint and the field that gave it (None: unconstrained)."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", JSON_OBJECT))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise BadRequest("response_format.json_schema.schema: required with type json_schema",
                             "response_format.json_schema")
        found.append(("response_format", StructuredOutput.of_json_schema(rf.json_schema.schema_)))
    if body.guided_json is not None:
        found.append(("guided_json", StructuredOutput.of_json_schema(body.guided_json)))
    if body.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput(kind="regex", spec=body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", StructuredOutput(kind="choice", spec=json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput(kind="grammar", spec=body.guided_grammar)))
    if body.structured_outputs is not None:
        found.extend(_vllm_structured_outputs(body))
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(n for n, _ in found))
        raise BadRequest(f"{names}: give one structured-output constraint at most", found[1][0])
    return found[0] if found else None


def _vllm_structured_outputs(body) -> list[tuple[str, StructuredOutput]]:
    so = body.structured_outputs
    out = []
    if so.json_ is not None:
        out.append(StructuredOutput.of_json_schema(so.json_))
    if so.regex is not None:
        out.append(StructuredOutput(kind="regex", spec=so.regex))
    if so.choice is not None:
        out.append(StructuredOutput(kind="choice", spec=json.dumps(so.choice)))
    if so.grammar is not None:
        out.append(StructuredOutput(kind="grammar", spec=so.grammar))
    if so.json_object:
        out.append(JSON_OBJECT)
    if not out:
        raise BadRequest("structured_outputs: give one of json, regex, choice, grammar, json_object",
                         "structured_outputs")
    return [("structured_outputs", s) for s in out]


@functools.lru_cache(maxsize=4)
def _compiler(tokenizer_dir: str, vocab_size: int, eos: int | None) -> GrammarCompiler:
    return GrammarCompiler.for_model(tokenizer_dir, vocab_size, [eos] if eos is not None else [])


async def check(fleet: FleetClient, field: str, so: StructuredOutput) -> None:
    """A 400 naming ``field`` when the spec does not compile (the result is cached for the worker's twin)."""
    tok = fleet.model.tokenizer
    if tok is None:
        raise BadRequest(f"{field}: structured outputs need the model's tokenizer", field)
    vocab = await fleet.vocab_size() or tok.vocab_size
    comp = await to_thread.run_sync(_compiler, str(tok.path), vocab, tok.eos_token_id)
    err = await to_thread.run_sync(comp.check, so)
    if err:
        raise BadRequest(f"{field}: invalid {so.kind} constraint: {err.strip()[:2000]}", field)
