"""Physical KV blocks of one device: ref counts, an O(1) free queue and the prefix-cache map.

This is the bottom half of the ledger (the PagedAttention paper's "block allocator", vLLM V1's
``BlockPool``). It knows nothing about sequences: ``KVCacheManager`` builds block tables on top of it.

* Every block has a ``ref_cnt``: the number of block tables that hold it. A block with ``ref_cnt == 0``
  is on the free queue; a block with ``ref_cnt > 0`` is not. Nothing else is tracked per block.
* ``FreeBlockQueue`` is an intrusive doubly linked list threaded through the blocks themselves, so
  taking a block out of the middle (a prefix-cache hit on a free block) is O(1), as are popleft and
  append. Blocks are handed out from the front.
* A full block whose tokens have been computed can be *cached*: it gets a ``block_hash`` (a chained
  hash of its tokens and all tokens before it) and is entered in ``cached_blocks``. When the last
  holder frees it, it stays in the map and goes to the *back* of the free queue, so it can be revived
  by a later request with the same prefix (``touch``) until it reaches the front and is reused for
  something else: only then is it evicted (removed from the map). Callers free a sequence's blocks
  tail first, so of one chain the tail is evicted before its head (LRU with the longest-lived prefix
  kept longest), as vLLM V1 does.
* A freed block without a hash holds nothing reusable: it goes to the *front* of the free queue so it
  is reused before any cached block is evicted.
"""

from __future__ import annotations

from typing import Iterable, Iterator

BlockHash = bytes


class KVBlock:
    """One physical block. ``prev_free``/``next_free`` link it into the free queue while it is free."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks with two sentinels; every operation is O(1)."""

    __slots__ = ("_head", "_tail", "num_free_blocks")

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free_blocks

    def __iter__(self) -> Iterator[KVBlock]:
        b = self._head.next_free
        while b is not self._tail:
            yield b
            b = b.next_free

    def popleft(self) -> KVBlock:
        b = self._head.next_free
        if b is self._tail:
            raise ValueError("no free blocks")
        nxt = b.next_free
        self._head.next_free = nxt
        nxt.prev_free = self._head
        b.prev_free = b.next_free = None
        self.num_free_blocks -= 1
        return b

    def remove(self, b: KVBlock) -> None:
        prv, nxt = b.prev_free, b.next_free
        if prv is None or nxt is None:
            raise ValueError(f"block {b.block_id} is not in the free queue")
        prv.next_free = nxt
        nxt.prev_free = prv
        b.prev_free = b.next_free = None
        self.num_free_blocks -= 1

    def append(self, b: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free = b
        b.prev_free = last
        b.next_free = self._tail
        self._tail.prev_free = b
        self.num_free_blocks += 1

    def appendleft(self, b: KVBlock) -> None:
        first = self._head.next_free
        self._head.next_free = b
        b.prev_free = self._head
        b.next_free = first
        first.prev_free = b
        self.num_free_blocks += 1

    def contains(self, b: KVBlock) -> bool:
        return b.prev_free is not None


class BlockPool:
    """All physical blocks of one device (GPU or CPU swap space)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, device: str = "gpu") -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self.num_blocks = num_blocks
        self.device = device
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        # counters
        self.num_evictions = 0
        self.num_cached_free = 0  # free blocks that still carry a hash (revivable prefix blocks)
        self.num_shared = 0  # blocks held by more than one table (kept here so stats never scan the blocks)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``get_new_blocks`` can hand out (cached free blocks included: they are evictable)."""
        return self.free_queue.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    # ------------------------------------------------------------------ allocation
    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take ``n`` blocks from the front of the free queue (evicting cached ones), each with ref 1."""
        if n > self.free_queue.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks: only {self.free_queue.num_free_blocks} free")
        out = []
        popleft = self.free_queue.popleft
        for _ in range(n):
            b = popleft()
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def get_new_block(self) -> KVBlock:
        b = self.free_queue.popleft()
        if b.block_hash is not None:
            self._evict(b)
        b.ref_cnt = 1
        return b

    def _evict(self, b: KVBlock) -> None:
        if self.cached_blocks.get(b.block_hash) is b:
            del self.cached_blocks[b.block_hash]
        b.block_hash = None
        self.num_evictions += 1
        self.num_cached_free -= 1

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block; a free (cached) block leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
                if b.block_hash is not None:
                    self.num_cached_free -= 1
            b.ref_cnt += 1
            if b.ref_cnt == 2:
                self.num_shared += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in the given (eviction) order.

        A block reaching ref 0 goes back on the free queue: to the back if it carries a hash (evicted
        last, in the order freed), to the front otherwise (reused first).
        """
        q = self.free_queue
        for b in blocks:
            rc = b.ref_cnt - 1
            if rc < 0:
                raise ValueError(f"double free of block {b.block_id}")
            b.ref_cnt = rc
            if rc == 1:
                self.num_shared -= 1
            elif rc == 0:
                if b.block_hash is not None:
                    q.append(b)
                    self.num_cached_free += 1
                else:
                    q.appendleft(b)

    def free_block(self, b: KVBlock) -> None:
        self.free_blocks((b,))

    # ------------------------------------------------------------------ prefix cache
    def cache_block(self, b: KVBlock, block_hash: BlockHash) -> bool:
        """Register a held, full, computed block under ``block_hash``. Returns whether it was entered.

        A block that already has a hash keeps it. If another block is already registered under this hash
        (the same content computed twice) the map keeps the existing one and ``b`` stays unhashed.
        """
        if not self.enable_caching or b.block_hash is not None:
            return False
        if block_hash in self.cached_blocks:
            return False
        if b.ref_cnt <= 0:
            raise ValueError(f"cannot cache free block {b.block_id}")
        b.block_hash = block_hash
        self.cached_blocks[block_hash] = b
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that nobody holds (e.g. after weights change). Returns how many."""
        n = 0
        for h, b in list(self.cached_blocks.items()):
            if b.ref_cnt == 0:
                del self.cached_blocks[h]
                b.block_hash = None
                self.num_cached_free -= 1
                # move it to the front: it holds nothing reusable any more
                self.free_queue.remove(b)
                self.free_queue.appendleft(b)
                n += 1
        return n

    # ------------------------------------------------------------------ introspection
    def num_shared_blocks(self) -> int:
        return self.num_shared

    def check_invariants(self) -> None:
        """Raise AssertionError when the pool's own bookkeeping is inconsistent (tests, debugging)."""
        in_queue = set()
        for b in self.free_queue:
            assert b.ref_cnt == 0, f"block {b.block_id} on the free queue with ref {b.ref_cnt}"
            assert b.block_id not in in_queue, f"block {b.block_id} twice on the free queue"
            in_queue.add(b.block_id)
        assert len(in_queue) == self.free_queue.num_free_blocks
        for b in self.blocks:
            if b.ref_cnt == 0:
                assert b.block_id in in_queue, f"free block {b.block_id} not on the free queue"
            assert b.ref_cnt >= 0
        for h, b in self.cached_blocks.items():
            assert b.block_hash == h
        hashed_free = sum(1 for b in self.blocks if b.ref_cnt == 0 and b.block_hash is not None)
        assert hashed_free == self.num_cached_free, (hashed_free, self.num_cached_free)
        shared = sum(1 for b in self.blocks if b.ref_cnt > 1)
        assert shared == self.num_shared, (shared, self.num_shared)
        for b in self.blocks:
            if b.block_hash is not None:
                assert self.cached_blocks.get(b.block_hash) is b
