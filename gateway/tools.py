"""Tool calling: `tools` / `tool_choice` / `parallel_tool_calls` into the prompt and the constraint, and
the model's text back into OpenAI `tool_calls`.

The tool definitions and the history's `tool_calls` / `tool` messages go to the chat template as
transformers passes them (`tools=` and the messages' own keys). A template that knows nothing of tools
(SmolLM2's) gets them the way Hermes-style templates write them: the definitions in a system message
inside `<tools>`, earlier calls as `<tool_call>` JSON, results inside `<tool_response>`.
`tool_choice` `required` or a named function is enforced with the grammar engine: the output is then a
JSON call `{"name": ..., "arguments": {...}}` (a list of them with parallel_tool_calls) whose arguments
match the function's schema. The output is parsed in the Llama-3 JSON form (a call object or a list) and
the Hermes `<tool_call>...</tool_call>` form.
"""

from __future__ import annotations

import json
import re
import uuid

from gateway.api_models import ChatCompletionRequest, FunctionCall, ToolCall
from gateway.errors import BadRequest
from protocol import StructuredOutput

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def active(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def _call_schema(fn) -> dict:
    params = fn.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def constraint(body: ChatCompletionRequest) -> StructuredOutput | None:
    """The grammar that `required` or a named tool_choice imposes (None: `auto` or `none`)."""
    tc = body.tool_choice
    if not body.tools or tc in (None, "auto", "none"):
        if tc not in (None, "none", "auto") and not body.tools:
            raise BadRequest("tool_choice: needs tools", "tool_choice")
        return None
    fns = {t.function.name: t.function for t in body.tools}
    if tc == "required":
        one = {"anyOf": [_call_schema(f) for f in fns.values()]}
    else:
        if tc.function.name not in fns:
            raise BadRequest(f"tool_choice: no tool named {tc.function.name!r} in tools", "tool_choice")
        one = _call_schema(fns[tc.function.name])
    if body.parallel_tool_calls is not False and tc == "required":
        one = {"type": "array", "items": one, "minItems": 1, "maxItems": 8}
    return StructuredOutput.of_json_schema(one)


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template and "tool_call" in template


def hermes_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The history for a template without tool support: tools in the system message, calls and results
    as Hermes text."""
    spec = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    intro = ("You can call functions. The functions are inside <tools></tools>:\n<tools>\n" + spec + "\n</tools>\n"
             "To call one, reply with <tool_call>{\"name\": <name>, \"arguments\": <arguments object>}</tool_call>.")
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = "".join(f"<tool_call>{json.dumps(c['function'], ensure_ascii=False)}</tool_call>"
                            for c in m.pop("tool_calls"))
            m["content"] = (m.get("content") or "") + calls
        if m["role"] == "tool":
            m["content"] = f"<tool_response>{m.get('content', '')}</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + intro}
    else:
        out.insert(0, {"role": "system", "content": intro})
    return out


def _as_calls(obj) -> list[dict] | None:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = it.get("arguments", it.get("parameters", {}))
        calls.append({"name": it["name"], "arguments": args})
    return calls or None


def parse(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content left, tool calls) from the model's text; no call: (text, [])."""
    found: list[dict] = []
    content = text
    if "<tool_call>" in text:
        for body in _HERMES.findall(text):
            try:
                calls = _as_calls(json.loads(body))
            except ValueError:
                calls = None
            if calls:
                found.extend(calls)
        content = text[: text.index("<tool_call>")].strip() or None
    else:
        s = text.strip()
        if s.startswith("<|python_tag|>"):
            s = s[len("<|python_tag|>"):]
        try:
            found = _as_calls(json.loads(s)) or []
        except ValueError:
            found = []
        if found:
            content = None
    found = [c for c in found if c["name"] in names]
    if not found:
        return text, []
    return content, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(
        name=c["name"], arguments=c["arguments"] if isinstance(c["arguments"], str)
        else json.dumps(c["arguments"], ensure_ascii=False))) for c in found]
