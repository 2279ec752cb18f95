"""The Scheduler's typed queries for the service (placement, stats) and the ledger queries behind them."""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from scheduler_fakes import FakeWorker, drive  # noqa: E402

from protocol import GenerationRequest, SamplingParams, WorkerInfo  # noqa: E402
from scheduler import Scheduler, SchedulerConfig, SchedulerStats, Sequence  # noqa: E402

BS = 4


def make(blocks=32, cpu=16, **cfg):
    wi = WorkerInfo(worker_id="w0", model="m", block_size=BS, num_gpu_blocks=blocks, num_cpu_blocks=cpu,
                    max_model_len=128, vocab_size=1000, eos_token_ids=[2], kv_block_bytes=1 << 20)
    cfg.setdefault("max_num_batched_tokens", 64)
    cfg.setdefault("max_num_seqs", 8)
    s = Scheduler(SchedulerConfig(**cfg), wi)
    return s, FakeWorker(wi, s)


def req(rid, prompt, **sp):
    sp.setdefault("seed", 1)
    sp.setdefault("max_tokens", 6)
    return GenerationRequest(request_id=rid, prompt_token_ids=list(prompt), sampling=SamplingParams(**sp))


def test_num_free_blocks_counts_cached_blocks_as_available():
    s, w = make()
    assert s.num_free_blocks == 32
    s.add_request(req("a", range(10, 23)))
    s.update(w.execute(s.schedule()))
    assert s.num_free_blocks == s.kv.gpu.num_free_blocks == 32 - 4
    drive(s, w)
    # 18 computed tokens: 4 full blocks stay cached (evictable), still available to a new request
    assert s.stats()["gpu_blocks_cached"] == 4 and s.num_free_blocks == 32


def test_cached_prefix_tokens_matches_admission_and_has_no_side_effects():
    s, w = make()
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks
    s.add_request(req("a", prompt))
    drive(s, w)
    order = [b.block_id for b in s.kv.gpu.free_queue]
    cached = dict(s.kv.gpu.cached_blocks)
    for probe, want in ((prompt, 12), (prompt[:12], 8), (prompt[:9], 8), (prompt + [5, 6], 12),
                        ([1] + prompt, 0), (prompt[:3], 0)):
        got = s.cached_prefix_tokens(probe)
        assert got == want, (probe, got)
        assert got == len(s.kv.find_cached_prefix(Sequence(-1, "", list(probe), len(probe)))) * BS
    assert [b.block_id for b in s.kv.gpu.free_queue] == order and s.kv.gpu.cached_blocks == cached
    s.add_request(req("b", prompt + [7]))
    s.update(w.execute(s.schedule()))
    assert s.groups["b"].num_cached_tokens == 12
    off, _ = make(enable_prefix_caching=False)
    assert off.cached_prefix_tokens(prompt) == 0


def test_stats_come_from_the_typed_snapshot_and_shared_blocks_are_counted():
    s, w = make()
    s.add_request(req("a", range(10, 19), n=3))
    s.update(w.execute(s.schedule()))  # the prompt completes: the children share its blocks
    st = s.get_stats()
    assert isinstance(st, SchedulerStats)
    assert s.stats() == dataclasses.asdict(st)
    assert st.gpu_blocks_shared == sum(1 for b in s.kv.gpu.blocks if b.ref_cnt > 1) == 3
    assert st.num_running_seqs == 3 and st.num_running == 1
    drive(s, w)
    assert s.get_stats().gpu_blocks_shared == 0
    s.check_invariants()


def test_allocate_group_slots_is_all_or_nothing():
    s, w = make(blocks=8)
    s.add_request(req("a", range(10, 17), n=2, max_tokens=40))
    s.update(w.execute(s.schedule()))  # 7 prompt tokens in 2 blocks, shared by both sequences
    seqs = list(s.groups["a"].live)
    kv = s.kv
    free = kv.num_free_blocks
    copies = []
    assert kv.allocate_group_slots([(x, 1) for x in seqs], copies) is not None  # one copy-on-write
    assert len(copies) == 1 and kv.num_free_blocks == free - 1
    for x in seqs:
        x.num_computed_tokens += 1
    big = [(x, 4 * kv.num_free_blocks) for x in seqs]  # more than the pool: nothing is taken
    before = [kv.block_ids(x.seq_id) for x in seqs]
    assert kv.allocate_group_slots(big, copies) is None
    assert [kv.block_ids(x.seq_id) for x in seqs] == before and len(copies) == 1
