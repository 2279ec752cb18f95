"""A step's results -> finish checks -> output deltas (no torch).

``apply_result`` advances every sequence of the plan by the tokens it computed, appends the sampled
tokens, decides which sequences finish (stop / EOS after min_tokens, max_tokens, max_model_len) and
builds one ``RequestOutputDelta`` per request with news. Requests that end outside a step's results
(abort, a failed step, a group that outgrew the GPU pool) get their final delta from ``final_delta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from protocol.messages import FinishReason, RequestOutputDelta, SequenceOutput, SequenceOutputDelta, StepResult
from scheduler import forking
from scheduler.plan_builder import RecordEntry, ScheduledStep
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED
_STOP = FinishReason.STOP
_LENGTH = FinishReason.LENGTH


def final_delta(g: SequenceGroup, outputs: list[SequenceOutputDelta], error: str | None = None) -> RequestOutputDelta:
    return RequestOutputDelta(request_id=g.request_id, outputs=outputs, num_prompt_tokens=g.prompt_len,
                              num_cached_tokens=g.num_cached_tokens, finished=True, error=error)


def ended(indices: Iterable[int], reason: FinishReason) -> list[SequenceOutputDelta]:
    """Empty outputs that only carry ``reason`` for the completions ``indices``."""
    return [SequenceOutputDelta(index=i, finish_reason=reason) for i in indices]


def apply_result(sched: Scheduler, step: ScheduledStep, result: StepResult) -> list[RequestOutputDelta]:
    """Apply the worker's result of ``step``; returns the deltas of the requests with news."""
    outs = {o.seq_id: o for o in result.outputs}
    kv = sched.kv
    bs = sched.block_size
    caching = kv.enable_prefix_caching
    cache_blocks = kv.cache_computed_blocks
    deltas: list[RequestOutputDelta] = []
    touched: list[SequenceGroup] = []  # groups with several deltas this step (sent together)
    beam_groups: list[SequenceGroup] = []
    for seq, k, sample in step.record:
        seq.num_inflight -= k
        seq.inflight_samples -= sample
        if seq.status is _FINISHED:
            continue  # aborted while the step ran (or, pipelined, finished by the step before it)
        c = seq.num_computed_tokens + k
        seq.num_computed_tokens = c
        if caching and c // bs > seq.num_cached_blocks:
            cache_blocks(seq)
        g = seq.group
        if not sample:
            _prefill_chunk_done(sched, g, seq, outs.get(seq.seq_id))
            continue
        o = outs.get(seq.seq_id)
        if o is None:
            raise ValueError(f"StepResult {result.step_id} has no output for sampled sequence {seq.seq_id}")
        if g.slow_path and _slow_path_sample(g, seq, o):
            if not beam_groups or beam_groups[-1] is not g:
                beam_groups.append(g)
            continue
        _append_token(sched, g, seq, o, deltas, touched)
    for g in beam_groups:
        if g.status is _RUNNING:
            forking.beam_step(sched, g, touched)
    for g in touched:
        deltas.append(_group_delta(g))
    sched.queues.compact()
    return deltas


def _prefill_chunk_done(sched: Scheduler, g: SequenceGroup, seq: Sequence, o: SequenceOutput | None) -> None:
    """A chunk that does not sample: regroup a recomputed forked group; keep its prompt logprobs."""
    if g.parked and seq.num_computed_tokens == seq.compute_limit:
        forking.regroup(sched, g)
    if g.want_prompt_logprobs and seq.seq_index == 0:
        if o is not None and o.prompt_logprobs and not g.prompt_logprobs_done:
            g.prompt_logprobs_buf.extend(o.prompt_logprobs)


def _slow_path_sample(g: SequenceGroup, seq: Sequence, o: SequenceOutput) -> bool:
    """Prompt logprobs and beam candidates of a sample. True for a beam: its token is chosen later."""
    if g.want_prompt_logprobs and not g.prompt_logprobs_done and seq.seq_index == 0:
        if o.prompt_logprobs:
            g.prompt_logprobs_buf.extend(o.prompt_logprobs)
        g.prompt_logprobs_ready = True
    if not g.beam:
        return False
    if o.top_logprobs is None:
        raise ValueError(f"beam search sequence {seq.seq_id}: the worker returned no top_logprobs")
    seq.beam_candidates = o.top_logprobs
    return True


def _append_token(sched: Scheduler, g: SequenceGroup, seq: Sequence, o: SequenceOutput,
                  deltas: list[RequestOutputDelta], touched: list[SequenceGroup]) -> None:
    """The sampled token: append it, check whether the sequence finishes, and build its delta."""
    tok = o.token_id
    toks = seq.token_ids
    toks.append(tok)
    n_out = len(toks) - seq.prompt_len
    fr = sr = None
    if tok in g.stop_ids and n_out >= g.min_tokens:
        fr = _STOP
        if tok in g.stop_token_ids and not (tok in sched.eos_token_ids and not g.sampling.ignore_eos):
            sr = tok
    elif n_out >= g.max_tokens or len(toks) >= sched.max_model_len:
        fr = _LENGTH
    if g.want_logprobs:
        lp = o.logprob
        if lp is not None:
            seq.cumulative_logprob += lp
        sd = SequenceOutputDelta(index=seq.seq_index, token_ids=[tok], logprobs=[lp],
                                 top_logprobs=[o.top_logprobs or []] if g.want_top else None,
                                 finish_reason=fr, stop_reason=sr)
    else:
        sd = SequenceOutputDelta(index=seq.seq_index, token_ids=[tok], finish_reason=fr, stop_reason=sr)
    if g.single:
        deltas.append(RequestOutputDelta(request_id=g.request_id, outputs=[sd], num_prompt_tokens=g.prompt_len,
                                         num_cached_tokens=g.num_cached_tokens, finished=fr is not None))
    else:
        if not g.delta_buf:
            touched.append(g)
        g.delta_buf.append(sd)
    if fr is not None:
        finish_seq(sched, seq)


def _group_delta(g: SequenceGroup) -> RequestOutputDelta:
    """The step's deltas of a group with several (n > 1, beams, prompt logprobs) as one."""
    buf = g.delta_buf
    g.delta_buf = []
    plp = None
    if g.prompt_logprobs_ready and not g.prompt_logprobs_done:
        plp = g.prompt_logprobs_buf
        g.prompt_logprobs_buf = []
        g.prompt_logprobs_done = True
    return RequestOutputDelta(request_id=g.request_id, outputs=buf, prompt_logprobs=plp,
                              num_prompt_tokens=g.prompt_len, num_cached_tokens=g.num_cached_tokens,
                              finished=g.status is _FINISHED)


def finish_seq(sched: Scheduler, seq: Sequence) -> None:
    g = seq.group
    g.live.remove(seq)
    sched.release_seq(seq)
    if not g.live:
        sched.finish_group(g)


def end_group(sched: Scheduler, g: SequenceGroup) -> list[int]:
    """Take ``g`` off the queues and free its sequences; returns the indices of those that were still
    unfinished (live and parked). The caller reports them (abort, a failed step)."""
    sched.queues.remove(g)
    idx = [s.seq_index for s in g.live] + forking.drop_parked(sched, g)
    for s in list(g.live):
        sched.release_seq(s)
    g.live.clear()
    g.status = _FINISHED
    sched.groups.pop(g.request_id, None)
    return idx


def fail_step(sched: Scheduler, record: list[RecordEntry], error: str) -> list[RequestOutputDelta]:
    """The worker failed the step: every request in it finishes with an error."""
    out = []
    seen = set()
    for seq, k, sample in record:
        seq.num_inflight -= k
        seq.inflight_samples -= sample
        g = seq.group
        if g.request_id in seen or g.status is _FINISHED:
            continue
        seen.add(g.request_id)
        idx = end_group(sched, g)
        out.append(final_delta(g, ended(sorted(idx), FinishReason.ERROR), error))
    return out


def finish_for_capacity(sched: Scheduler, g: SequenceGroup) -> None:
    """``g`` alone cannot get the blocks it needs (it outgrew the GPU pool): stop it (length)."""
    if g.use_beam_search:
        for s in g.live + g.parked:
            forking.add_hypothesis(g, list(s.token_ids), s.cumulative_logprob, _LENGTH)
        end_group(sched, g)
        outs = forking.beam_outputs(g)
    else:
        outs = ended(end_group(sched, g), _LENGTH)
    sched.num_finished += 1
    sched.pending_deltas.append(final_delta(g, outs))
