"""Structured outputs through the fleet (real redis-server, scheduler, one CPU worker, gateway) with the
official openai client: `chat.completions.parse` with a pydantic model, `json_object`, vLLM's
`guided_choice` / `guided_regex` / `guided_grammar`, streaming, and bad specs refused with a 400.

Bounded: the schema's strings and arrays have maximum lengths (a 135M model at temperature 1 would
otherwise write a string for ever), and the 20 samples of `parse` run as 4 concurrent requests of n=5
with seeds 0..3 (20 distinct random streams: seed and sequence index), in one batch on the worker."""

from __future__ import annotations

import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from fleet_harness import module_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "fleet", num_workers=1, num_gpu_blocks=512, max_model_len=2048)


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=300)


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Color


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    favourite: Color
    address: Address
    pets: list[Pet] = Field(max_length=2)


MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def test_parse_pydantic_model_validates_over_20_samples(client):
    def one(seed):
        return client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Person, n=5,
                                             temperature=1.0, seed=seed, max_tokens=160)

    with ThreadPoolExecutor(4) as ex:
        resps = list(ex.map(one, range(4)))
    choices = [c for r in resps for c in r.choices]
    assert len(choices) == 20
    texts = set()
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        p = c.message.parsed
        assert isinstance(p, Person), c.message.content
        Person.model_validate_json(c.message.content)  # the text itself validates
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{3}", p.code)
        texts.add(c.message.content)
    assert len(texts) > 10  # temperature 1: really sampled, not one forced text


def test_json_object_always_parses_and_streams(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                       n=3, temperature=1.0, seed=7, max_tokens=80)
    for c in r.choices:
        if c.finish_reason == "stop":  # a 135M model may write one long string: only finished ones must parse
            assert isinstance(json.loads(c.message.content), dict)
    assert sum(c.finish_reason == "stop" for c in r.choices) >= 2
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=rf, temperature=1.0, seed=3, max_tokens=60, stream=True)
        if ch.choices)
    d = json.loads(streamed)
    assert set(d) == {"ok", "n"} and isinstance(d["ok"], bool) and isinstance(d["n"], int)


def test_guided_choice_regex_and_grammar_always_match(client):
    r = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", n=8, temperature=1.0, seed=1,
                                  max_tokens=10, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert all(c.text in ("yes", "no", "maybe") for c in r.choices)
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r = client.completions.create(model=MODEL, prompt="Today's date:", n=8, temperature=1.0, seed=2,
                                  max_tokens=20, extra_body={"guided_regex": date})
    assert all(re.fullmatch(date, c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, temperature=1.0, seed=4,
                                       max_tokens=20,
                                       extra_body={"structured_outputs": {"grammar": 'start: "A" ("b" | "c")+ "!"'}})
    assert all(re.fullmatch(r"A[bc]+!", c.message.content) for c in r.choices if c.finish_reason == "stop")


def test_bad_specs_are_400s_naming_the_field(fleet, client):
    cases = [({"guided_regex": "[0-9"}, "guided_regex"),
             ({"guided_json": {"type": "object", "properties": {"a": {"type": 5}}}}, "guided_json"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
             ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
             ({"response_format": {"type": "xml"}}, "response_format")]
    for extra, field in cases:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4, **extra}
        r = httpx.post(fleet.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"].startswith(field) and field in err["message"], err
    # {"type": "text"} is the default: accepted, unconstrained
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "text"},
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.content
