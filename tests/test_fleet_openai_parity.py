"""OpenAI API parity through the fleet (real redis-server, scheduler, one CPU worker, gateway) with the
official openai client: echo with logprobs (and max_tokens 0) equal to HF transformers' log-softmax,
vLLM's prompt_logprobs, logit_bias, best_of > n, GET /v1/models/{id}, /tokenize and /detokenize, OpenAI's
harmless fields accepted, and every field of the openai package's request types either supported,
accepted and ignored (api_models.IGNORED_FIELDS) or refused with a 400 that names it."""

from __future__ import annotations

import json
import typing

import httpx
import openai
import pytest
import torch

from fleet_harness import module_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "fleet", num_workers=1, num_gpu_blocks=256, max_model_len=1024)


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def hf_prompt_logprobs(model_dir, ids: list[int]) -> list[float]:
    """HF transformers (float32) log-softmax of each prompt token given the ones before it."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_logprobs_equal_hf_and_prompt_logprobs(fleet, client, smollm2_files):
    ids = httpx.post(fleet.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == PROMPT and len(lp.tokens) == len(ids)  # the prompt alone: max_tokens 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = hf_prompt_logprobs(smollm2_files.path, ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # echo with a generated token (lm-evaluation-harness sends max_tokens 1): prompt entries, then one more
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.logprobs.tokens) == len(ids) + 1
    assert max(abs(a - b) for a, b in zip(c.logprobs.token_logprobs[1:len(ids)], want)) < 1e-4
    # vLLM's prompt_logprobs: per token {id: {logprob, rank, decoded_token}}, the prompt's token first
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 1})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        assert abs(plp[i][str(ids[i])]["logprob"] - want[i - 1]) < 1e-4


def test_logit_bias_and_best_of(fleet, client):
    tok = httpx.post(fleet.url + "/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(tok): 100})
    assert r.choices[0].text == " banana" * 3
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(tok): -100})
    assert "banana" not in r.choices[0].text
    # best_of 6, n 2: the 2 of 6 samples with the highest cumulative logprob, best first
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=5, n=2,
                                  best_of=6, logprobs=0)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums[0] >= sums[1]
    every = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=5, n=6,
                                      logprobs=0)
    all_sums = sorted((sum(c.logprobs.token_logprobs) for c in every.choices), reverse=True)
    assert sums == pytest.approx(all_sums[:2], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3, best_of=2)


def test_models_tokenize_detokenize(fleet, client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.model_extra["max_model_len"] == 1024
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    t = httpx.post(fleet.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 1024
    d = httpx.post(fleet.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"].endswith("Hello world")
    chat = httpx.post(fleet.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    assert httpx.post(fleet.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def _fields(td) -> set[str]:
    return set(typing.get_type_hints(td))


def test_openai_request_fields_supported_ignored_or_refused_by_name(fleet, client):
    """Every field of the openai package's request types: supported (in our model), accepted and ignored
    (IGNORED_FIELDS) or refused with a 400 naming it. A field OpenAI adds later fails here first."""
    from openai.types import completion_create_params as ccp
    from openai.types.chat import completion_create_params as chp

    from gateway.api_models import IGNORED_FIELDS, ChatCompletionRequest, CompletionRequest

    for td, ours, path, base in (
        (ccp.CompletionCreateParamsBase, CompletionRequest, "/v1/completions", {"prompt": "x"}),
        (chp.CompletionCreateParamsBase, ChatCompletionRequest, "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "x"}]}),
    ):
        for name in sorted(_fields(td)):
            if name in ours.model_fields:
                continue
            assert name not in IGNORED_FIELDS
            r = httpx.post(fleet.url + path, json={"model": MODEL, **base, "max_tokens": 1, name: None}, timeout=60)
            assert r.status_code == 400 and name in r.json()["error"]["message"], (name, r.text)
    # the ignored ones are accepted
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       metadata={"a": "b"}, store=False, service_tier="auto", user="u",
                                       prompt_cache_key="k", safety_identifier="s", parallel_tool_calls=True)
    assert r.choices[0].finish_reason == "length"
    # response types: every field we send is one the openai types declare
    from openai.types import Completion, CompletionChoice
    from openai.types.chat import ChatCompletion

    from gateway.api_models import ChatCompletionResponse, CompletionResponse
    from gateway.api_models import CompletionChoice as OurChoice

    vllm_extras = {"stop_reason", "prompt_logprobs"}
    assert set(CompletionResponse.model_fields) <= set(Completion.model_fields)
    assert set(OurChoice.model_fields) - vllm_extras <= set(CompletionChoice.model_fields)
    assert set(ChatCompletionResponse.model_fields) <= set(ChatCompletion.model_fields)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_args(call, tool):
    import jsonschema

    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_and_required_tool_calls_parse_and_match_the_schema(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _check_args(call, WEATHER)
    # streamed: the deltas assemble to the same call
    name, args, finish = None, "", None
    for ch in client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                             max_tokens=60, stream=True,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for d in ch.choices:
            for tc in d.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert (name, args, finish) == ("get_weather", call.function.arguments, "tool_calls")
    # required, two tools, one call each (parallel_tool_calls false), sampled
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, n=3, temperature=1.0, seed=2, max_tokens=60)
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        (call,) = c.message.tool_calls
        _check_args(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_result_turn_reaches_the_template(fleet, client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    t = httpx.post(fleet.url + "/tokenize", json={"messages": history, "tools": [WEATHER]}).json()["tokens"]
    prompt = httpx.post(fleet.url + "/detokenize", json={"tokens": t}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "21 degrees and sunny" in prompt and "<tools>" in prompt


MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " banana", " seven"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" purple", " four", " Tuesday"], "answer": 1},
    {"question": "The opposite of hot is", "choices": [" cold", " table", " running"], "answer": 0},
]


def test_lm_evaluation_harness_local_completions_runs_a_multiple_choice_task(fleet, smollm2_files, tmp_path,
                                                                               monkeypatch):
    """lm-evaluation-harness's `local-completions` (echo + logprobs loglikelihoods) on a task from local files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={fleet.url}/v1/completions,model={MODEL},tokenizer={smollm2_files.path},"
                   "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), num_fewshot=0)
    acc = out["results"]["tiny_mc"]["acc,none"]
    assert acc >= 2 / 3  # a 135M model gets these right; every loglikelihood came from echo + logprobs


def test_langchain_bind_tools_and_structured_output(fleet):
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=fleet.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60,
                     max_retries=0)
    one = llm.bind_tools([WEATHER], tool_choice="get_weather")
    msg = one.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    two = llm.bind_tools([WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    msg2 = two.invoke("What time is it in Rome?")
    assert len(msg2.tool_calls) == 1 and msg2.tool_calls[0]["name"] in ("get_weather", "get_time")
    # the follow-up turn with the tool's result
    reply = llm.bind_tools([WEATHER]).invoke(["What is the weather in Paris?", msg,
                                              ToolMessage("21 degrees and sunny", tool_call_id=call["id"])])
    assert reply.content or reply.tool_calls

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int

    got = llm.with_structured_output(City).invoke("Name a big city and its population.")
    assert isinstance(got, City)
