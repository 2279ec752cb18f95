"""Benchmark workloads (token ids only: no model needed) and a dummy worker for ledger-only runs.

``mixed``: 256 requests; ``rng = random.Random(0)`` draws ``(prompt_len, output_len) =
(rng.randint(64, 1024), rng.randint(32, 512))`` per request, in that order; prompt token ids come from a
separate ``random.Random(1)`` over a 49152-token vocabulary; ``ignore_eos``, ``max_tokens = output_len``,
max_model_len 2048.
``cpu32``: 32 requests, ``(rng.randint(32, 256), rng.randint(16, 128))`` from ``random.Random(0)``, same
token ids rule (small enough for a CPU run of the real model).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from protocol.messages import GenerationRequest, SequenceOutput, StepPlan, StepResult, TokenLogprob, WorkerInfo
from protocol.sampling import SamplingParams
from scheduler import Scheduler, SchedulerConfig

VOCAB_SIZE = 49152


@dataclass
class Workload:
    name: str
    requests: list[GenerationRequest]
    max_model_len: int
    vocab_size: int = VOCAB_SIZE

    @property
    def lengths(self) -> list[tuple[int, int]]:
        return [(len(r.prompt_token_ids), r.sampling.max_tokens) for r in self.requests]


def _make(name: str, num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
          max_model_len: int) -> Workload:
    rng = random.Random(0)
    tok_rng = random.Random(1)
    reqs = []
    for i in range(num):
        prompt_len = rng.randint(*prompt_range)
        output_len = rng.randint(*output_range)
        prompt = [tok_rng.randrange(VOCAB_SIZE) for _ in range(prompt_len)]
        reqs.append(GenerationRequest(
            request_id=f"{name}-{i}", prompt_token_ids=prompt, arrival_time=float(i),
            sampling=SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)))
    return Workload(name, reqs, max_model_len)


def mixed() -> Workload:
    return _make("mixed", 256, (64, 1024), (32, 512), 2048)


def cpu32() -> Workload:
    return _make("cpu32", 32, (32, 256), (16, 128), 2048)


WORKLOADS = {"mixed": mixed, "cpu32": cpu32}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]()
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}") from None


class DummyWorker:
    """Answers a StepPlan without a model: every sampled sequence (and fork child) gets a dummy token.

    It only tracks which sequences exist; the point is to drive the scheduler and ledger.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, token_id: int = 7) -> None:
        self.vocab_size = vocab_size
        self.token_id = token_id
        self.beam: set[int] = set()

    def execute(self, plan: StepPlan) -> StepResult:
        outs = []
        tok = self.token_id
        for ns in plan.new_sequences:
            if ns.sampling.beam_width:
                self.beam.add(ns.seq_id)
        for f in plan.forks:
            if f.parent_seq_id in self.beam:
                self.beam.add(f.child_seq_id)
        for e in plan.scheduled:
            if not e.sample:
                continue
            ids = [e.seq_id] + [f.child_seq_id for f in e.fork_children]
            for sid in ids:
                if sid in self.beam:
                    cands = [TokenLogprob(token_id=(tok + j) % self.vocab_size, logprob=-1.0 - j) for j in range(8)]
                    outs.append(SequenceOutput(seq_id=sid, token_id=cands[0].token_id, logprob=-1.0,
                                               top_logprobs=cands))
                else:
                    outs.append(SequenceOutput(seq_id=sid, token_id=tok, logprob=-1.0))
        return StepResult(worker_id=plan.worker_id, step_id=plan.step_id, outputs=outs)


def ledger_run(workload: Workload, num_gpu_blocks: int, block_size: int, max_num_batched_tokens: int,
               max_num_seqs: int) -> Iterator[tuple[Scheduler, StepPlan]]:
    """The workload through the real Scheduler and ledger with a DummyWorker (no model): each step's plan,
    yielded with the scheduler once the step's result is applied."""
    info = WorkerInfo(worker_id="bench", model="none", block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                      num_cpu_blocks=0, max_model_len=workload.max_model_len, vocab_size=workload.vocab_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs),
                      info)
    for r in workload.requests:
        sched.add_request(r)
    worker = DummyWorker(workload.vocab_size)
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        sched.update(worker.execute(plan))
        yield sched, plan
