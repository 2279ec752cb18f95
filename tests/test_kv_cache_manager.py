"""KVCacheManager: on-demand slots, prefix caching, fork + copy-on-write, swap, free order."""

import hashlib
from array import array

import pytest

from scheduler.kv_cache_manager import KVCacheManager
from scheduler.sequence import Sequence, hash_block_tokens

BS = 4


def mk(seq_id, tokens, prompt_len=None):
    return Sequence(seq_id, f"r{seq_id}", list(tokens), len(tokens) if prompt_len is None else prompt_len)


def compute(kv, seq, k, copies=None):
    """Allocate slots for k tokens and mark them computed (what a step does)."""
    copies = [] if copies is None else copies
    ups = kv.allocate_slots(seq, k, copies)
    assert ups is not None
    seq.num_computed_tokens += k
    kv.cache_computed_blocks(seq)
    return ups


def test_hash_is_chained_and_process_independent():
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h0 == hashlib.blake2b(array("q", [1, 2, 3, 4]).tobytes(), digest_size=16).digest()
    assert hash_block_tokens(h0, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(h0, [5, 6, 7, 8]) == hash_block_tokens(h0, [5, 6, 7, 8])


def test_on_demand_allocation():
    kv = KVCacheManager(16, BS)
    s = mk(1, range(10))
    kv.allocate_sequence(s)
    assert kv.block_ids(1) == []
    ups = compute(kv, s, 10)
    assert ups == [(0, 0), (1, 1), (2, 2)]  # ceil(10 / 4) blocks, not more
    s.token_ids.append(99)
    assert compute(kv, s, 1) == []  # slot 10 is in block 2
    s.token_ids.append(99)
    assert compute(kv, s, 1) == []  # slot 11
    s.token_ids.append(99)
    assert compute(kv, s, 1) == [(3, 3)]  # slot 12 needs a new block
    assert kv.gpu.num_used_blocks == 4
    assert kv.slot_usage() == (16, 13)
    kv.check_invariants()


def test_allocate_slots_fails_without_side_effects():
    kv = KVCacheManager(2, BS)
    s = mk(1, range(12))
    kv.allocate_sequence(s)
    copies = []
    assert kv.allocate_slots(s, 12, copies) is None
    assert kv.block_ids(1) == [] and kv.gpu.num_free_blocks == 2 and copies == []
    assert kv.allocate_slots(s, 8, copies) == [(0, 0), (1, 1)]


def test_prefix_cache_hit_and_cap():
    kv = KVCacheManager(32, BS)
    a = mk(1, range(14))
    kv.allocate_sequence(a)
    compute(kv, a, 14)  # 3 full blocks cached, the partial 4th not
    assert len(kv.gpu.cached_blocks) == 3
    b = mk(2, list(range(12)) + [77, 78])
    hits = kv.find_cached_prefix(b)
    assert [h.block_id for h in hits] == kv.block_ids(1)[:3]
    assert kv.can_admit(hits, 1)
    assert kv.allocate_sequence(b, hits) == 12
    assert all(blk.ref_cnt == 2 for blk in hits)
    # a prompt that is exactly the cached blocks still computes its last token: the hit stops a block short
    c = mk(3, range(12))
    assert len(kv.find_cached_prefix(c)) == 2
    # a different first block shares nothing (chained hash)
    d = mk(4, [5] + list(range(1, 14)))
    assert kv.find_cached_prefix(d) == []
    kv.check_invariants()
    assert kv.prefix_hit_tokens == 12 and kv.prefix_query_tokens == 28


def test_prefix_cache_revives_freed_blocks_and_disabled():
    kv = KVCacheManager(8, BS)
    a = mk(1, range(9))
    kv.allocate_sequence(a)
    compute(kv, a, 9)
    kv.free(a)
    assert kv.gpu.num_free_blocks == 8 and kv.gpu.num_cached_free == 2
    b = mk(2, range(9))
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    kv.allocate_sequence(b, hits)
    assert kv.gpu.num_cached_free == 0 and kv.gpu.num_free_blocks == 6
    kv.check_invariants()
    off = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = mk(1, range(9))
    off.allocate_sequence(a)
    compute(off, a, 9)
    assert off.find_cached_prefix(mk(2, range(9))) == [] and not off.gpu.cached_blocks


def test_fork_shares_all_blocks_and_copy_on_write():
    kv = KVCacheManager(32, BS)
    parent = mk(1, range(10))
    kv.allocate_sequence(parent)
    compute(kv, parent, 10)
    kids = []
    for i in range(3):
        c = parent.fork(10 + i, i + 1)
        kv.fork(parent, c)
        kids.append(c)
    prompt_blocks = kv.block_ids(1)
    assert [kv.gpu.blocks[b].ref_cnt for b in prompt_blocks] == [4, 4, 4]  # the partial last block too
    assert kv.gpu.num_used_blocks == 3
    seqs = [parent] + kids
    for s in seqs:
        s.token_ids.append(500 + s.seq_id)
    work = [(s, 1) for s in seqs]
    assert kv.num_blocks_needed(work) == 3  # 4 writers of a block held by 4: the last writes in place
    copies = []
    all_ups = [kv.allocate_slots(s, 1, copies) for s in seqs]
    assert len(copies) == 3 and all(src == prompt_blocks[2] for src, _ in copies)
    assert all_ups[:3] == [[(2, dst)] for _, dst in copies]
    assert all_ups[3] == []  # last holder: ref 1 now, no copy
    assert kv.gpu.blocks[prompt_blocks[2]].ref_cnt == 1
    assert [kv.gpu.blocks[b].ref_cnt for b in prompt_blocks[:2]] == [4, 4]
    assert kv.gpu.num_used_blocks == 2 + 4  # shared full blocks + one last block each
    assert kv.num_cow_copies == 3
    kv.check_invariants()
    # a writer of a block also held outside the batch copies it
    x = kids[0].fork(20, 9)
    kv.fork(kids[0], x)
    assert kv.num_blocks_needed([(x, 1)]) == 1
    for s in seqs + [x]:
        kv.free(s)
    assert kv.gpu.num_free_blocks == 32
    kv.check_invariants()


def test_free_releases_tail_first():
    kv = KVCacheManager(4, BS)
    s = mk(1, range(13))
    kv.allocate_sequence(s)
    compute(kv, s, 13)
    b = kv.block_ids(1)
    kv.free(s)
    # the unhashed partial block comes first (reused first), then the chain tail .. head
    assert [x.block_id for x in kv.gpu.free_queue] == [b[3], b[2], b[1], b[0]]


def test_swap_out_and_in_keep_sharing():
    kv = KVCacheManager(16, BS, num_cpu_blocks=8)
    p = mk(1, range(6))
    kv.allocate_sequence(p)
    compute(kv, p, 6)
    c = p.fork(2, 1)
    kv.fork(p, c)
    assert kv.can_swap_out([p, c])
    pairs = kv.swap_out([p, c])
    assert len(pairs) == 2 and kv.num_unique_blocks([p, c]) == 2  # shared blocks move once
    assert kv.gpu.num_free_blocks == 16 and kv.cpu.num_used_blocks == 2
    assert all(kv.cpu.blocks[cb].ref_cnt == 2 for _, cb in pairs)
    assert kv.get_table(1).device == "cpu"
    kv.check_invariants()
    back = kv.swap_in([p, c])
    assert [cb for cb, _ in back] == [cb for _, cb in pairs]
    assert kv.block_ids(1) == kv.block_ids(2) == [g for _, g in back]
    assert kv.cpu.num_free_blocks == 8 and kv.num_swap_in_blocks == 2 and kv.num_swap_out_blocks == 2
    kv.check_invariants()
    small = KVCacheManager(16, BS, num_cpu_blocks=1)
    s = mk(3, range(6))
    small.allocate_sequence(s)
    compute(small, s, 6)
    assert not small.can_swap_out([s])
    with pytest.raises(ValueError):
        small.swap_out([s])


def test_check_invariants_catches_a_bad_ref_count():
    kv = KVCacheManager(4, BS)
    s = mk(1, range(5))
    kv.allocate_sequence(s)
    compute(kv, s, 5)
    kv.gpu.blocks[kv.block_ids(1)[0]].ref_cnt += 1
    with pytest.raises(AssertionError):
        kv.check_invariants()
