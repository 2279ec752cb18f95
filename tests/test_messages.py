"""The hot-path messages (msgspec Structs): wire round trips, validation on decode, pydantic-named helpers."""

from __future__ import annotations

import pytest

from protocol import (
    FinishReason,
    ForkSequence,
    NewSequence,
    RequestOutputDelta,
    SamplingParams,
    ScheduledSequence,
    SequenceOutput,
    SequenceOutputDelta,
    StepPlan,
    StepResult,
    TokenLogprob,
)
from protocol import wire


def _plan() -> StepPlan:
    sp = SamplingParams(temperature=0.7, top_k=5, stop="x", logprobs=2, seed=3)
    return StepPlan(
        step_id=7, worker_id="w", freed_seq_ids=[4], swap_out=[(1, 2)], swap_in=[(3, 4)], block_copies=[(5, 6)],
        new_sequences=[NewSequence(seq_id=1, request_id="r", prompt_len=2, token_ids=[1, 2], block_table=[0, 9],
                                   num_computed_tokens=1, sampling=sp, seed=11)],
        forks=[ForkSequence(parent_seq_id=1, child_seq_id=2, seq_index=1)],
        scheduled=[ScheduledSequence(seq_id=1, num_tokens=1, block_updates=[(2, 8)], append_token_ids=[5],
                                     reset_block_table=[0, 9], sample=False,
                                     fork_children=[ForkSequence(parent_seq_id=1, child_seq_id=3, seq_index=2)]),
                   ScheduledSequence(seq_id=2, num_tokens=1)])


def _result() -> StepResult:
    top = [TokenLogprob(token_id=3, logprob=-0.25), TokenLogprob(token_id=4, logprob=-1.5)]
    return StepResult(step_id=7, worker_id="w", execute_ms=1.5, outputs=[
        SequenceOutput(seq_id=1, token_id=3, logprob=-0.25, top_logprobs=top),
        SequenceOutput(seq_id=2, prompt_logprobs=[None, [TokenLogprob(token_id=1, logprob=-2.0)]])])


def _delta() -> RequestOutputDelta:
    return RequestOutputDelta(request_id="r", num_prompt_tokens=3, finished=True, outputs=[
        SequenceOutputDelta(index=0, token_ids=[1, 2], logprobs=[-0.5, -1.0],
                            top_logprobs=[[TokenLogprob(token_id=1, logprob=-0.5)], []],
                            finish_reason=FinishReason.STOP, stop_reason="x"),
        SequenceOutputDelta(index=1, finish_reason=FinishReason.LENGTH, stop_reason=7)])


@pytest.mark.parametrize("make", [_plan, _result, _delta, lambda: StepPlan(step_id=0)])
def test_round_trips(make):
    msg = make()
    cls = type(msg)
    assert wire.decode(wire.encode(msg), cls) == msg
    assert cls.model_validate_json(msg.model_dump_json(exclude_defaults=True)) == msg
    assert cls.model_validate_json(msg.model_dump_json()) == msg
    assert cls.model_validate(msg.model_dump()) == msg
    assert cls.model_validate(msg.model_dump(mode="json")) == msg


def test_wire_form_leaves_defaults_out_and_types_come_back():
    raw = wire.encode(StepPlan(step_id=3, scheduled=[ScheduledSequence(seq_id=1, num_tokens=1)]))
    assert raw == b'{"step_id":3,"scheduled":[{"seq_id":1,"num_tokens":1}]}'
    plan = wire.decode(wire.encode(_plan()), StepPlan)
    assert isinstance(plan.new_sequences[0].sampling, SamplingParams)
    assert plan.new_sequences[0].sampling == _plan().new_sequences[0].sampling
    assert plan.swap_out == [(1, 2)] and isinstance(plan.swap_out[0], tuple)
    d = wire.decode(wire.encode(_delta()), RequestOutputDelta)
    assert d.outputs[0].finish_reason is FinishReason.STOP and d.outputs[1].stop_reason == 7


def test_model_dump_has_every_field_like_pydantic():
    d = ScheduledSequence(seq_id=1, num_tokens=2).model_dump()
    assert d == {"seq_id": 1, "num_tokens": 2, "reset_block_table": None, "block_updates": [],
                 "append_token_ids": [], "sample": True, "fork_children": []}
    assert _delta().model_dump()["outputs"][0]["finish_reason"] is FinishReason.STOP
    assert _delta().model_dump(mode="json")["outputs"][0]["finish_reason"] == "stop"
    assert "error" not in _delta().model_dump(exclude_none=True)


@pytest.mark.parametrize("raw, where", [
    ('{"step_id": "x"}', "$.step_id"),
    ('{"step_id": 1, "bogus": 2}', "bogus"),
    ('{"scheduled": []}', "step_id"),
    ('{"step_id": 1, "scheduled": [{"seq_id": 1, "num_tokens": 1.5}]}', "$.scheduled[0].num_tokens"),
    ('{"step_id": 1, "swap_in": [[1, 2, 3]]}', "$.swap_in[0]"),
    ('{"step_id": 1, "new_sequences": [{"seq_id": 1, "request_id": "r", "prompt_len": 1, "token_ids": [1], '
     '"block_table": [], "seed": 0, "sampling": {"temperature": -1}}]}', "$.new_sequences[0].sampling"),
    ('not json', "JSON"),
])
def test_malformed_plan_raises_a_clear_error(raw, where):
    with pytest.raises(ValueError, match=None) as e:
        StepPlan.model_validate_json(raw)
    assert isinstance(e.value, wire.ValidationError) or "JSON" in str(e.value)
    assert where in str(e.value)


def test_malformed_delta_names_the_field():
    with pytest.raises(wire.ValidationError, match=r"Invalid enum value 'nope' - at `\$.outputs\[0\].finish_reason`"):
        RequestOutputDelta.model_validate_json('{"request_id": "a", "outputs": [{"index": 0, "finish_reason": "nope"}]}')


def test_keyword_constructors_defaults_copy_and_mutation():
    s = ScheduledSequence(seq_id=1, num_tokens=1)
    assert (s.block_updates, s.append_token_ids, s.sample, s.reset_block_table, s.fork_children) == ([], [], True,
                                                                                                    None, [])
    assert s.block_updates is not ScheduledSequence(seq_id=2, num_tokens=1).block_updates  # fresh defaults
    with pytest.raises(TypeError):
        ScheduledSequence(1, 1)  # keywords only, as with pydantic
    plan = StepPlan(step_id=1, scheduled=[s])
    assert plan.num_batched_tokens == 1 and not plan.is_empty and StepPlan(step_id=2).is_empty
    other = plan.model_copy(update={"step_id": 5})
    assert other.step_id == 5 and plan.step_id == 1 and other.scheduled is plan.scheduled
    deep = plan.model_copy(deep=True)
    assert deep == plan and deep.scheduled is not plan.scheduled
    plan.step_id = 9  # mutable, like the pydantic models were
    assert plan.step_id == 9
