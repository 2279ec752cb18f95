"""The offline API a user touches: LLM.generate / chat, the `pagedfleet generate` CLI, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from protocol import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    from pagedfleet.llm import LLM

    return LLM(None, max_num_batched_tokens=256)


def test_chat_answers_in_english(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_same_seed_same_output_and_n_completions_differ(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    a = llm.generate("Once upon a time", params)[0]
    b = llm.generate("Once upon a time", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1, "4 samples at temperature 1 should differ"
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in a.outputs)
    # The four completions shared the prompt's blocks: the ledger made copy-on-write copies.
    stats = llm.engine.scheduler.stats()
    assert stats.get("num_cow_copies", stats.get("cow_copies", 0)) > 0, stats


def test_stop_string_is_honoured_exactly(llm):
    base = llm.generate("Count: one, two, three, four,", SamplingParams(temperature=0, max_tokens=24))[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.generate("Count: one, two, three, four,", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    comp = cut.outputs[0]
    assert comp.text == text[: text.index(stop)]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop


def test_logprobs_are_returned(llm):
    out = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4 and all(lp <= 0 for lp in out.logprobs)
    assert all(len(top) == 3 for top in out.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(top[0].token_id == t for top, t in zip(out.top_logprobs, out.token_ids))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(not_a_field=1), "not_a_field"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kwargs)
    assert field in str(e.value)


def test_bad_prompts_fail_clearly_and_disturb_nothing(llm):
    eng = llm.engine
    good = eng.add_request("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("", SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.add_request(list(range(1, eng.max_model_len + 5)), SamplingParams())
    with pytest.raises(ValidationError, match="max_tokens"):
        eng.add_request("hi", {"max_tokens": 0})
    outs = {o.request_id: o for o in eng.run_to_completion()}
    assert set(outs) == {good}
    alone = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert outs[good].outputs[0].token_ids == alone.outputs[0].token_ids


def test_cli_generate_json():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "pagedfleet.cli", "generate", "--prompt", "The capital of France is",
         "--max-tokens", "6", "--json", "--n", "2", "--temperature", "0.7", "--seed", "3"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in proc.stdout.strip().splitlines()]
    assert len(lines) == 2
    assert all(isinstance(l["text"], str) and len(l["token_ids"]) >= 1 for l in lines)


def test_cli_bad_input_exits_with_message():
    proc = subprocess.run(
        [sys.executable, "-m", "pagedfleet.cli", "generate", "--prompt", "hi", "--max-tokens", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "max_tokens" in proc.stderr


def test_bf16_greedy_tokens_do_not_depend_on_asking_for_logprobs():
    """A plain greedy step takes its argmax over the LM head's bf16 logits on the device; asking for logprobs
    sends the same step through the sampler's float32 path. The tokens must be the same."""
    from pagedfleet.llm import LLM

    llm = LLM(None, dtype="bfloat16", max_num_batched_tokens=256)
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colours:"]
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    with_lp = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, logprobs=1))
    for a, b in zip(plain, with_lp):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(set(a.outputs[0].token_ids)) > 3  # real text, not one token repeated


def test_token_budget_defaults_to_vllms_offline_one():
    """Unset, a step's token budget is vLLM's for its offline class: 2048 on the CPU (16384 on a large GPU,
    8192 on others); a value given is kept."""
    from pagedfleet.engine import LLMEngine

    assert LLMEngine(model="random:tiny").config.max_num_batched_tokens == 2048
    assert LLMEngine(model="random:tiny", max_num_batched_tokens=512).config.max_num_batched_tokens == 512
