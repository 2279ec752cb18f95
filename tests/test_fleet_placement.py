"""The scheduler service's placement and resume logic, in process (real Schedulers, no Redis, no model)."""

from __future__ import annotations

import pytest

from protocol import GenerationRequest, SamplingParams, WorkerInfo
from protocol import streams as S
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.server.config import SchedulerSettings
from scheduler.server.state import ReqState, WorkerHandle
from scheduler.service import SchedulerService


def _handle(wid: str, blocks: int = 64, max_len: int = 2048) -> WorkerHandle:
    info = WorkerInfo(worker_id=wid, model="m", num_gpu_blocks=blocks, num_cpu_blocks=0, max_model_len=max_len,
                      vocab_size=1000, eos_token_ids=[2])
    reg = S.WorkerRegistration(info=info, incarnation=wid + "-1")
    return WorkerHandle(reg, Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), info))


def _svc(*handles: WorkerHandle) -> SchedulerService:
    svc = SchedulerService(SchedulerSettings())
    for h in handles:
        svc.workers[h.wid] = h
    return svc


def _req(rid: str, prompt: list[int], **sp) -> ReqState:
    return ReqState(GenerationRequest(request_id=rid, prompt_token_ids=prompt,
                                      sampling=SamplingParams(temperature=0, **sp)))


def _fill_prefix_cache(h: WorkerHandle, prompt: list[int]) -> None:
    """Run a request through h's Scheduler with a dummy worker so its prompt blocks get cached."""
    from pagedfleet.bench.workloads import DummyWorker

    h.sched.add_request(GenerationRequest(request_id="warm", prompt_token_ids=prompt,
                                          sampling=SamplingParams(max_tokens=1)))
    w = DummyWorker(vocab_size=1000)
    while h.sched.has_unfinished_requests():
        h.sched.update(w.execute(h.sched.schedule()))


def test_fits_first_then_shortest_queue():
    small, big = _handle("small", blocks=4), _handle("big", blocks=64)
    svc = _svc(small, big)
    assert [h.wid for h in svc.placement.rank_workers(_req("a", list(range(3, 103))))] == ["big", "small"]  # 7 blocks
    for i in range(2):
        big.sched.add_request(GenerationRequest(request_id=f"q{i}", prompt_token_ids=[5, 6, 7]))
    assert [h.wid for h in svc.placement.rank_workers(_req("b", [5, 6, 7]))] == ["small", "big"]


def test_prefix_hit_wins_unless_its_queue_is_much_longer():
    a, b = _handle("a"), _handle("b")
    svc = _svc(a, b)
    prompt = list(range(10, 10 + 80))
    _fill_prefix_cache(b, prompt)
    assert svc.placement.rank_workers(_req("p", prompt + [1, 2]))[0].wid == "b"
    for i in range(svc.settings.max_queue_imbalance + 1):
        b.sched.add_request(GenerationRequest(request_id=f"q{i}", prompt_token_ids=[5, 6, 7]))
    assert svc.placement.rank_workers(_req("p", prompt + [1, 2]))[0].wid == "a"


def test_too_long_for_a_worker_context():
    short, long_ = _handle("short", max_len=64), _handle("long", max_len=2048)
    svc = _svc(short, long_)
    assert [h.wid for h in svc.placement.rank_workers(_req("a", list(range(3, 103))))] == ["long"]


def _drive(sched):
    """Run a Scheduler to the end against a dummy worker that tracks each sequence's tokens as a real
    worker does. Returns ({seq_index: tokens before its first sample}, {seq_index: emitted deltas})."""
    from pagedfleet.bench.workloads import DummyWorker

    w = DummyWorker(vocab_size=1000)
    toks, index, first, emitted = {}, {}, {}, {}
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        for sid in plan.freed_seq_ids:
            toks.pop(sid, None)
        for ns in plan.new_sequences:
            toks[ns.seq_id], index[ns.seq_id] = list(ns.token_ids), ns.seq_index
        for f in plan.forks:
            toks[f.child_seq_id], index[f.child_seq_id] = list(toks[f.parent_seq_id]), f.seq_index
        sampled = []
        for e in plan.scheduled:
            toks[e.seq_id] += e.append_token_ids
            for f in e.fork_children:
                toks[f.child_seq_id], index[f.child_seq_id] = list(toks[e.seq_id]), f.seq_index
            if e.sample:
                sampled += [e.seq_id] + [f.child_seq_id for f in e.fork_children]
        res = w.execute(plan)
        for sid in sampled:
            first.setdefault(index[sid], list(toks[sid]))
            toks[sid].append(w.token_id)
        for d in sched.update(res):
            for o in d.outputs:
                emitted.setdefault(o.index, []).append(o)
    return first, emitted


@pytest.mark.parametrize("n", [1, 3])
def test_resume_request_continues_each_completion(n):
    h = _handle("w")
    prompt = [5, 6, 7, 8] * 5  # more than a block
    req = GenerationRequest(request_id="r", prompt_token_ids=prompt,
                            sampling=SamplingParams(n=n, max_tokens=10, temperature=1.0, seed=11))
    generated = [[100 + i, 200 + i, 300 + i][: 3 - (i % 2)] for i in range(n)]
    finished = [1] if n > 1 else []
    h.sched.resume_request(req, generated, finished)
    first, emitted = _drive(h.sched)
    live = [i for i in range(n) if i not in finished]
    assert sorted(first) == live
    for i in live:
        assert first[i] == prompt + generated[i]  # continues from the tokens it had, not from the prompt
        toks = [t for o in emitted[i] for t in o.token_ids]
        assert len(toks) == 10 - len(generated[i])
        assert [o.finish_reason for o in emitted[i] if o.finish_reason] == ["length"]
    assert 1 not in emitted or all(not o.token_ids for o in emitted[1])


def test_resume_with_nothing_generated_is_a_plain_add():
    h = _handle("w")
    req = GenerationRequest(request_id="r", prompt_token_ids=[5, 6, 7], sampling=SamplingParams(n=2))
    h.sched.resume_request(req, [[], []], [])
    plan = h.sched.schedule()
    assert [ns.seq_index for ns in plan.new_sequences] == [0]
    assert plan.scheduled[-1].fork_children  # n = 2 forks after the prefill as usual
