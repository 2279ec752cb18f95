"""BlockPool / FreeBlockQueue: ref counts, O(1) free queue, prefix-cache map, LRU eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock


def ids(blocks):
    return [b.block_id for b in blocks]


def test_free_queue_order_and_o1_ops():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and ids(q) == [0, 1, 2, 3, 4]
    q.remove(blocks[2])  # from the middle
    assert ids(q) == [0, 1, 3, 4] and not q.contains(blocks[2])
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.appendleft(blocks[0])
    assert ids(q) == [0, 1, 3, 4, 2] and len(q) == 5
    for b in list(q):
        q.remove(b)
    assert len(q) == 0 and ids(q) == []
    with pytest.raises(ValueError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(blocks[1])  # not in the queue


def test_get_and_free_blocks():
    pool = BlockPool(8)
    got = pool.get_new_blocks(3)
    assert ids(got) == [0, 1, 2] and all(b.ref_cnt == 1 for b in got)
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    pool.touch(got[:1])
    assert got[0].ref_cnt == 2
    pool.free_blocks(got)
    assert got[0].ref_cnt == 1 and pool.num_free_blocks == 7
    # unhashed freed blocks go to the front: reused first
    assert ids(pool.free_queue)[:2] == [2, 1]
    pool.free_block(got[0])
    with pytest.raises(ValueError):
        pool.free_block(got[0])  # double free
    with pytest.raises(ValueError):
        pool.get_new_blocks(9)
    pool.check_invariants()


def test_cached_blocks_revive_and_evict_lru_tail_first():
    pool = BlockPool(6)
    chain = pool.get_new_blocks(3)
    for i, b in enumerate(chain):
        assert pool.cache_block(b, bytes([i]))
    other = pool.get_new_blocks(1)
    # free the chain tail first (as a sequence does): tail is evicted first
    pool.free_blocks(reversed(chain))
    pool.free_blocks(other)
    assert pool.num_cached_free == 3
    assert ids(pool.free_queue) == [3, 4, 5, 2, 1, 0]  # unhashed first, then the chain tail..head
    # a prefix hit revives a free cached block
    hit = pool.get_cached_block(bytes([0]))
    assert hit is chain[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_cached_free == 2 and not pool.free_queue.contains(hit)
    # reusing the free blocks evicts the cached tail before the rest
    got = pool.get_new_blocks(4)
    assert ids(got) == [3, 4, 5, 2]
    assert pool.num_evictions == 1 and pool.get_cached_block(bytes([2])) is None and chain[2].block_hash is None
    assert pool.get_cached_block(bytes([1])) is chain[1]
    pool.check_invariants()


def test_cache_block_rules():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, b"h")
    assert not pool.cache_block(b, b"h")  # same content already cached: keep the existing block
    assert b.block_hash is None
    assert not pool.cache_block(a, b"other")  # a block keeps its hash
    pool.free_blocks([a, b])
    with pytest.raises(ValueError):
        pool.cache_block(pool.blocks[2], b"x")  # free blocks cannot be cached
    assert pool.reset_prefix_cache() == 1 and pool.get_cached_block(b"h") is None
    pool.check_invariants()
    off = BlockPool(2, enable_caching=False)
    (c,) = off.get_new_blocks(1)
    assert not off.cache_block(c, b"h")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get", "free", "touch", "cache"]), st.integers(0, 31)), max_size=80))
def test_pool_random_ops_keep_invariants(ops):
    """Against a plain model: ref counts, free count and the queue agree after any op sequence."""
    pool = BlockPool(12)
    refs = {}  # block id -> model ref count
    for op, x in ops:
        held = [pool.blocks[i] for i, r in sorted(refs.items()) if r > 0]
        if op == "get":
            n = x % 4
            if n <= pool.num_free_blocks:
                for b in pool.get_new_blocks(n):
                    assert refs.get(b.block_id, 0) == 0
                    refs[b.block_id] = 1
        elif op == "free" and held:
            b = held[x % len(held)]
            pool.free_block(b)
            refs[b.block_id] -= 1
        elif op == "touch":
            cached = list(pool.cached_blocks.values())
            if cached:
                b = cached[x % len(cached)]
                pool.touch([b])
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        elif op == "cache" and held:
            pool.cache_block(held[x % len(held)], bytes([x]))
        pool.check_invariants()
        for b in pool.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0)
        assert pool.num_free_blocks == sum(1 for b in pool.blocks if b.ref_cnt == 0)
