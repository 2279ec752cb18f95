"""Fast builders for the per-sequence protocol messages on the scheduler's hot path.

The scheduler builds a ``ScheduledSequence`` per scheduled sequence and a ``SequenceOutputDelta`` /
``RequestOutputDelta`` per sampled token, every step. Their field values are produced here from already
typed state, so re-validating them would only cost time (~3.5 us each with pydantic; this path is ~1 us).
The builders fill every field exactly as validation would. At import they are checked against the
validated constructor; if a pydantic upgrade ever makes them differ, they fall back to validation.
"""

from __future__ import annotations

from protocol.messages import RequestOutputDelta, ScheduledSequence, SequenceOutputDelta

_new = object.__new__
_set = object.__setattr__


# (the module globals are bound as default arguments: local lookups are measurably faster here)
def _fast_scheduled(seq_id, num_tokens, block_updates, append_token_ids, sample, reset_block_table=None,
                    fork_children=None, _new=_new, _set=_set, _cls=ScheduledSequence):
    o = _new(_cls)
    _set(o, "__dict__", {
        "seq_id": seq_id,
        "num_tokens": num_tokens,
        "reset_block_table": reset_block_table,
        "block_updates": block_updates,
        "append_token_ids": append_token_ids,
        "sample": sample,
        "fork_children": fork_children if fork_children is not None else [],
    })
    _set(o, "__pydantic_fields_set__", {"seq_id", "num_tokens", "block_updates", "append_token_ids", "sample"})
    _set(o, "__pydantic_extra__", None)
    _set(o, "__pydantic_private__", None)
    return o


def _fast_seq_delta(index, token_ids, logprobs=None, top_logprobs=None, finish_reason=None, stop_reason=None,
                    _new=_new, _set=_set, _cls=SequenceOutputDelta):
    o = _new(_cls)
    _set(o, "__dict__", {
        "index": index,
        "token_ids": token_ids,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    })
    _set(o, "__pydantic_fields_set__", {"index", "token_ids"})
    _set(o, "__pydantic_extra__", None)
    _set(o, "__pydantic_private__", None)
    return o


def _fast_request_delta(request_id, outputs, prompt_logprobs, num_prompt_tokens, num_cached_tokens, finished,
                        error=None, _new=_new, _set=_set, _cls=RequestOutputDelta):
    o = _new(_cls)
    _set(o, "__dict__", {
        "version": 1,
        "request_id": request_id,
        "outputs": outputs,
        "prompt_logprobs": prompt_logprobs,
        "num_prompt_tokens": num_prompt_tokens,
        "num_cached_tokens": num_cached_tokens,
        "finished": finished,
        "error": error,
    })
    _set(o, "__pydantic_fields_set__", {"request_id", "outputs", "num_prompt_tokens", "num_cached_tokens",
                                        "finished"})
    _set(o, "__pydantic_extra__", None)
    _set(o, "__pydantic_private__", None)
    return o


def _slow_scheduled(seq_id, num_tokens, block_updates, append_token_ids, sample, reset_block_table=None,
                    fork_children=None):
    return ScheduledSequence(seq_id=seq_id, num_tokens=num_tokens, block_updates=block_updates,
                             append_token_ids=append_token_ids, sample=sample,
                             reset_block_table=reset_block_table, fork_children=fork_children or [])


def _slow_seq_delta(index, token_ids, logprobs=None, top_logprobs=None, finish_reason=None, stop_reason=None):
    return SequenceOutputDelta(index=index, token_ids=token_ids, logprobs=logprobs, top_logprobs=top_logprobs,
                               finish_reason=finish_reason, stop_reason=stop_reason)


def _slow_request_delta(request_id, outputs, prompt_logprobs, num_prompt_tokens, num_cached_tokens, finished,
                        error=None):
    return RequestOutputDelta(request_id=request_id, outputs=outputs, prompt_logprobs=prompt_logprobs,
                              num_prompt_tokens=num_prompt_tokens, num_cached_tokens=num_cached_tokens,
                              finished=finished, error=error)


def _self_check() -> bool:
    try:
        from protocol.messages import PROTOCOL_VERSION, FinishReason

        if PROTOCOL_VERSION != 1:
            return False
        a = _fast_scheduled(3, 1, [(0, 5)], [7], True)
        b = _slow_scheduled(3, 1, [(0, 5)], [7], True)
        if a != b or a.model_dump() != b.model_dump():
            return False
        a = _fast_seq_delta(1, [4], [-0.5], None, FinishReason.STOP, 9)
        b = _slow_seq_delta(1, [4], [-0.5], None, FinishReason.STOP, 9)
        if a != b or a.model_dump_json() != b.model_dump_json():
            return False
        a = _fast_request_delta("r", [a], None, 3, 0, True)
        b = _slow_request_delta("r", [b], None, 3, 0, True)
        return a == b and a.model_dump_json() == b.model_dump_json()
    except Exception:  # pragma: no cover - pydantic internals changed
        return False


if _self_check():
    make_scheduled, make_seq_delta, make_request_delta = _fast_scheduled, _fast_seq_delta, _fast_request_delta
else:  # pragma: no cover
    make_scheduled, make_seq_delta, make_request_delta = _slow_scheduled, _slow_seq_delta, _slow_request_delta
