"""The worker's persistent per-sequence state: penalty histories kept on the device, updated by diffs, give
exactly what rebuilding them from the token lists every step gave (over steps, a fork, a free)."""

from __future__ import annotations

import torch

from gpu_worker.sampler import SampleRequest
from protocol import ForkSequence, NewSequence, SamplingParams, ScheduledSequence, StepPlan


def test_penalty_histories_equal_the_token_lists():
    from gpu_worker import ModelRunner, WorkerConfig

    r = ModelRunner(WorkerConfig(model="random:tiny", seed=3, num_gpu_blocks=64))
    sample = r.sampler.sample
    penalized = []

    def checked(logits, reqs, state=None):
        by_slot = {s.pen_slot: s for s in r.seqs.values() if s.pen_slot >= 0}
        ref = [SampleRequest(q.params, q.seed, q.seq_index, q.output_pos,
                             by_slot[q.history_slot].token_ids if q.history_slot >= 0 else (), q.prompt_len)
               for q in reqs]
        assert torch.equal(r.sampler.process_logits(logits.float(), reqs, state),
                           r.sampler.process_logits(logits.float(), ref))
        out = sample(logits, reqs, state)
        again = sample(logits, ref)
        assert out.token_ids == again.token_ids and out.logprobs == again.logprobs
        assert all(q.param_row >= 0 for q in reqs)  # the parameter tensors came from the persistent table
        penalized.append(sum(q.history_slot >= 0 for q in reqs))
        return out

    r.sampler.sample = checked
    ps = [SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                         max_tokens=20, seed=1),
          SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=20),
          SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, max_tokens=20)]
    news = [NewSequence(seq_id=i, request_id=str(i), prompt_len=5, token_ids=[1, 2, 3, 2, 1 + i],
                        block_table=[2 * i, 2 * i + 1, 40 + i], sampling=p, seed=i) for i, p in enumerate(ps)]
    fork = [ForkSequence(parent_seq_id=0, child_seq_id=10, seq_index=1)]
    r.execute(StepPlan(step_id=0, new_sequences=news, scheduled=[
        ScheduledSequence(seq_id=i, num_tokens=5, fork_children=fork if i == 0 else []) for i in range(3)]))
    for step in range(1, 10):
        live = (0, 2, 10) if step >= 5 else (0, 1, 2, 10)
        r.execute(StepPlan(step_id=step, freed_seq_ids=[1] if step == 5 else [], scheduled=[
            ScheduledSequence(seq_id=i, num_tokens=1, block_updates=[(0, 50)] if (i == 10 and step == 1) else [])
            for i in live]))
    assert penalized == [3] * 5 + [2] * 5  # sequences 0, 1 and the fork child 10; then 1 is freed
    assert r.batch.histories.free  # the freed sequence's row is free again
