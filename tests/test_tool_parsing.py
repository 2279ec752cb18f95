"""gateway/tools.py: the model's text into OpenAI tool calls (Hermes and Llama-3 JSON forms), and the
grammar a required or named tool_choice imposes."""

import json

from gateway import tools
from gateway.api_models import ChatCompletionRequest

NAMES = {"get_weather", "get_time"}


def test_hermes_form_with_text_before_and_two_calls():
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"city": "Rome"}}</tool_call>')
    content, calls = tools.parse(text, NAMES)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    assert len({c.id for c in calls}) == 2


def test_llama3_json_forms_and_plain_text():
    _, calls = tools.parse('{"name": "get_time", "parameters": {"city": "Oslo"}}', NAMES)
    assert calls[0].function.name == "get_time" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    _, calls = tools.parse('<|python_tag|>[{"name": "get_time", "arguments": {}}]', NAMES)
    assert len(calls) == 1
    assert tools.parse("It is sunny.", NAMES) == ("It is sunny.", [])
    assert tools.parse('{"name": "rm_rf", "arguments": {}}', NAMES)[1] == []  # not an offered tool
    assert tools.parse("<tool_call>{not json</tool_call>", NAMES)[1] == []


def test_required_and_named_choice_constraints():
    fn = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [fn],
                                                 "tool_choice": "required"})
    schema = json.loads(tools.constraint(body).spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [fn],
                                                 "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert json.loads(tools.constraint(body).spec)["properties"]["name"] == {"const": "get_time"}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [fn]})
    assert tools.constraint(body) is None  # auto
