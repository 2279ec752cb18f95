"""Pipelined scheduling (scheduler/lookahead.py) gives exactly the synchronous engine's outputs.

One mixed batch on the real SmolLM2 with a KV pool small enough to force preemptions: greedy and seeded
requests, stop strings, a stop token, EOS, max_tokens, n > 1, beam search, prompt logprobs and an abort
mid-run. The pipelined engine (1 plan ahead) and the synchronous one must produce identical completions;
the ledger's invariants hold after every step and no block is held at the end.
"""

from __future__ import annotations

import pytest

from pagedfleet.engine import LLMEngine
from protocol import SamplingParams

PROMPTS = [
    ("The capital of France is", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
    ("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=30, stop=[" 7"])),
    ("Tell me about the sea.", SamplingParams(temperature=0, max_tokens=3)),
    ("Say hello.", SamplingParams(temperature=0, max_tokens=64)),  # the instruct model ends it with EOS
    ("A list of fruits:", SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=12)),
    ("Once upon a time", SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[13])),
    ("The abort victim says", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
    ("Beam me up", SamplingParams(temperature=0, beam_width=2, n=2, max_tokens=8)),
    ("Logprobs of a prompt", SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, logprobs=2)),
    ("Numbers 10 20 30", SamplingParams(temperature=0.7, seed=3, max_tokens=20, presence_penalty=0.5)),
]
ABORT_ID, ABORT_AFTER = "r6", 5  # aborted once this many of its tokens are out


def _run(pipeline: bool, preemption_mode: str) -> tuple[dict, LLMEngine]:
    eng = LLMEngine(pipeline=pipeline, num_gpu_blocks=9, num_cpu_blocks=64, max_num_batched_tokens=64, max_num_seqs=16,
                    preemption_mode=preemption_mode, freeze_gc=False)
    sched = eng.scheduler
    for i, (prompt, sp) in enumerate(PROMPTS):
        eng.add_request(prompt, sp, request_id=f"r{i}")
    done, aborted = {}, False
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == ABORT_ID and not aborted and len(out.outputs[0].token_ids) >= ABORT_AFTER:
                eng.abort_request(ABORT_ID)
                aborted = True
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
        sched.check_invariants()
    kv = sched.kv
    assert not kv.tables, "a sequence still holds blocks"
    assert kv.num_free_blocks == kv.gpu.num_blocks and kv.cpu.num_free_blocks == kv.cpu.num_blocks
    return done, eng


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_pipelined_outputs_equal_synchronous(mode):
    sync, e_sync = _run(False, mode)
    piped, e_piped = _run(True, mode)
    assert len(sync) == len(PROMPTS)
    assert piped == sync
    s, p = e_sync.scheduler, e_piped.scheduler
    # the batch did what it is meant to exercise, in both forms
    for sched in (s, p):
        assert sched.num_preemptions_swap + sched.num_preemptions_recompute > 0
    assert s.num_steps_ahead == 0 and p.num_steps_ahead > p.num_steps // 4
    reasons = {r for outs in sync.values() for _, _, r in outs}
    assert {"stop", "length", "abort"} <= reasons
    assert len(sync[ABORT_ID][0][0]) == ABORT_AFTER  # nothing sampled after the abort is shown
    assert sync["r1"][0][1].endswith(" 6,")  # the stop string is cut exactly
    assert len(sync["r4"]) == 3 and len(sync["r7"]) == 2


# ---------------------------------------------------------------------- the ledger under pipelining
# The ledger property tests' fake worker (tests/scheduler_fakes.py) samples each token from (seed, index,
# position) and checks every K/V read through the block tables, so a pipelined run must give the tokens of
# a synchronous one, with the ledger consistent after every plan and every update.
import collections  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_ledger_properties as lp  # noqa: E402
from scheduler_fakes import drive  # noqa: E402


def drive_pipelined(s, w, lookahead: int = 1, abort_at: dict | None = None, max_steps: int = 20000):
    """``drive`` with up to ``1 + lookahead`` plans in flight; ``abort_at``: {update number: request id}."""
    tokens: dict = {}
    reasons: dict = {}
    q: collections.deque = collections.deque()
    updates = 0
    while s.has_unfinished_requests() or q:
        while len(q) < 1 + lookahead:
            plan = s.schedule() if s.num_in_flight == 0 else s.schedule_ahead()
            if plan is None:
                break
            s.check_invariants()
            lp.check_step(s, plan)
            q.append(w.execute(plan))  # the worker runs the plans in order, ahead of the updates
            if s.num_in_flight == 0:
                break
        for d in s.update(q.popleft()):
            for o in d.outputs:
                tokens.setdefault(d.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
                if o.finish_reason is not None:
                    reasons.setdefault(d.request_id, {})[o.index] = o.finish_reason
        s.check_invariants()
        updates += 1
        assert updates <= max_steps, "no progress"
        if abort_at and updates in abort_at:
            s.abort_request(abort_at[updates])
    return tokens, reasons


def _loaded(cfg, reqs):
    """A fresh ledger and its fake worker with ``reqs`` queued (those it refuses as never fitting skipped)."""
    s, w = lp.build(cfg)
    for i, a in enumerate(reqs):
        try:
            s.add_request(lp.make_request(i, a))
        except ValueError:
            continue
    return s, w


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=lp.configs, reqs=st.lists(lp.arrivals, min_size=1, max_size=10), lookahead=st.sampled_from([1, 2]))
def test_pipelined_ledger_runs_equal_synchronous(cfg, reqs, lookahead):
    """Pipelined = synchronous, token for token and reason for reason, except (known, docs/fleet.md) the last
    tokens of a group stopped for outgrowing the whole pool: it ends 'length' short of its max_tokens, and
    pipelined it may end a token apart (one plan more was in flight when the pool ran out)."""
    runs = []
    for pipelined in (False, True):
        s, w = _loaded(cfg, reqs)
        out = drive_pipelined(s, w, lookahead) if pipelined else drive(s, w)[:2]
        lp.assert_all_free(s)
        runs.append(out)
    (tok_a, why_a), (tok_b, why_b) = runs
    assert tok_a.keys() == tok_b.keys() and why_a.keys() == why_b.keys()
    max_tokens = {f"r{i}": a[3] for i, a in enumerate(reqs)}
    for rid in tok_a:
        pool_stop = any(why.get(rid, {}).get(i) == "length" and len(t) < max_tokens[rid]
                        for why, toks in ((why_a, tok_a), (why_b, tok_b)) for i, t in toks[rid].items())
        if not pool_stop:
            assert tok_a[rid] == tok_b[rid] and why_a.get(rid) == why_b.get(rid), rid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=lp.configs, reqs=st.lists(lp.arrivals, min_size=2, max_size=10),
       aborts=st.dictionaries(st.integers(1, 30), st.integers(0, 9), max_size=4))
def test_pipelined_aborts_keep_the_ledger_consistent(cfg, reqs, aborts):
    s, w = _loaded(cfg, reqs)
    _, reasons = drive_pipelined(s, w, 1, {k: f"r{v % len(reqs)}" for k, v in aborts.items()})
    lp.assert_all_free(s)
    plan = s.schedule()  # the last frees reach the worker
    s.update(w.execute(plan))
    assert not w.seqs


def test_pipeline_settings_and_flags():
    from scheduler.server.config import SchedulerSettings

    assert SchedulerSettings().max_plans_in_flight == 2  # the fleet pipelines by default
    assert SchedulerSettings.from_cli(["--no-pipeline"]).max_plans_in_flight == 1
    assert SchedulerSettings.from_cli(["--pipeline"]).max_plans_in_flight == 2
    assert SchedulerSettings.from_cli(["--pipeline", "--pipeline-lookahead", "3"]).max_plans_in_flight == 4
    with pytest.raises(ValueError, match="lookahead"):
        LLMEngine(lookahead=-1)
