"""The block ledger's policy half: per-sequence block tables over a GPU and a CPU ``BlockPool``.

What maps to the PagedAttention paper (Kwon et al., SOSP 2023) and vLLM:

* ``BlockTable``: a sequence's logical -> physical block map (paper section 4.2). Logical block ``i``
  holds token positions ``[i * block_size, (i + 1) * block_size)``.
* ``allocate_slots``: on-demand allocation (4.3): a block is taken only when a token to compute needs a
  slot in it, so a sequence wastes at most the unfilled tail of its last block.
* copy-on-write (4.4): ``fork`` makes the child share every block of the parent (ref + 1, the partial
  last block included). The first write into a block whose ``ref_cnt > 1`` allocates a new block,
  emits a ``(src, dst)`` copy and replaces that table entry; the last holder writes in place.
* automatic prefix caching (vLLM): a full block whose tokens are computed is entered in the pool's
  hash map under ``H(parent block hash, its token ids)``; a new sequence starts from the longest
  chain of cached blocks (at most ``len - 1`` tokens, so at least one token is computed for logits).
* swapping (4.5): ``swap_out`` copies a group's GPU blocks into CPU blocks (shared blocks stay shared:
  one CPU block per distinct GPU block) and frees the GPU ones; ``swap_in`` does the reverse.

All methods that can run out of blocks check first and have no side effects when they fail.
"""

from __future__ import annotations

from typing import Iterable

from scheduler.block_pool import BlockPool, KVBlock
from scheduler.sequence import Sequence, hash_block_tokens

BlockUpdates = list[tuple[int, int]]  # a table's changed entries: (logical index, physical block)


class BlockTable:
    """Physical blocks of one sequence on one device (``gpu`` or ``cpu``)."""

    __slots__ = ("seq", "blocks", "device")

    def __init__(self, seq: Sequence, blocks: list[KVBlock], device: str = "gpu") -> None:
        self.seq = seq
        self.blocks = blocks
        self.device = device

    def __len__(self) -> int:
        return len(self.blocks)

    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def __repr__(self) -> str:
        return f"BlockTable(seq={self.seq.seq_id}, {self.device}, {self.block_ids()})"


class KVCacheManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu = BlockPool(num_gpu_blocks, enable_caching=enable_prefix_caching, device="gpu")
        self.cpu = BlockPool(num_cpu_blocks, enable_caching=False, device="cpu")
        self.tables: dict[int, BlockTable] = {}
        # counters
        self.num_cow_copies = 0
        self.num_swap_out_blocks = 0
        self.num_swap_in_blocks = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ------------------------------------------------------------------ queries
    def get_table(self, seq_id: int) -> BlockTable | None:
        return self.tables.get(seq_id)

    def block_ids(self, seq_id: int) -> list[int]:
        return self.tables[seq_id].block_ids()

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """GPU blocks a new allocation can take: free ones, cached-but-evictable included."""
        return self.gpu.free_queue.num_free_blocks

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """Tokens ``seq`` can compute with the slots in its table plus every free block; 0 when its next
        slot is in a shared block (that write needs a copy first)."""
        blocks = self.tables[seq.seq_id].blocks
        bs = self.block_size
        c = seq.num_computed_tokens
        first = c // bs
        if first < len(blocks) and blocks[first].ref_cnt > 1:
            return 0
        return (len(blocks) + self.gpu.num_free_blocks) * bs - c

    # ------------------------------------------------------------------ prefix cache
    def find_cached_prefix(self, seq: Sequence, max_tokens: int | None = None) -> list[KVBlock]:
        """Longest chain of cached GPU blocks matching ``seq``'s leading full blocks (no side effects).

        At most ``(len - 1) // block_size`` blocks, so at least the last token is computed (the step
        needs its logits) and no cached block is ever written.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        n = len(seq.token_ids) if max_tokens is None else min(max_tokens, len(seq.token_ids))
        max_blocks = (n - 1) // bs
        cached = self.gpu.cached_blocks
        hits: list[KVBlock] = []
        hs = seq.block_hashes
        for i in range(max_blocks):
            h = hs[i] if i < len(hs) else seq.full_block_hashes(i + 1, bs)[i]
            b = cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def num_cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Tokens of ``token_ids`` the prefix cache holds, in whole blocks (the ``find_cached_prefix`` rule:
        at most ``len - 1`` tokens). No side effects: nothing is touched, allocated or kept."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        cached = self.gpu.cached_blocks
        h = None
        n = 0
        for i in range((len(token_ids) - 1) // bs):
            h = hash_block_tokens(h, token_ids[i * bs:(i + 1) * bs])
            if h not in cached:
                break
            n += 1
        return n * bs

    @staticmethod
    def num_blocks_revived(hits: Iterable[KVBlock]) -> int:
        """Distinct blocks among prefix hits that are free now: taking them uses up free-queue room."""
        return len({b.block_id for b in hits if b.ref_cnt == 0})

    def can_admit(self, hits: list[KVBlock], num_new_blocks: int, watermark_blocks: int = 0) -> bool:
        """Would taking ``hits`` (revived from the free queue if free) plus ``num_new_blocks`` new blocks
        leave at least ``watermark_blocks`` free?"""
        revived = sum(1 for b in hits if b.ref_cnt == 0)
        return self.gpu.num_free_blocks - revived - num_new_blocks >= watermark_blocks

    def allocate_sequence(self, seq: Sequence, hits: list[KVBlock] = ()) -> int:
        """Give a new (or recomputed) sequence its table starting with the cached prefix ``hits``.

        Sets ``seq.num_computed_tokens`` to the hit length and returns it. Slots for the tokens to
        compute come from ``allocate_slots``.
        """
        if seq.seq_id in self.tables:
            raise ValueError(f"sequence {seq.seq_id} already has a block table")
        hits = list(hits)
        self.gpu.touch(hits)
        self.tables[seq.seq_id] = BlockTable(seq, hits, "gpu")
        n = len(hits) * self.block_size
        seq.num_computed_tokens = n
        seq.num_cached_blocks = len(hits)
        if self.enable_prefix_caching:
            self.prefix_query_tokens += len(seq.token_ids)
            self.prefix_hit_tokens += n
        return n

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s full, computed blocks to the prefix cache (call after the step computed them)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = seq.num_computed_tokens // bs
        start = seq.num_cached_blocks
        if n_full <= start:
            return
        table = self.tables.get(seq.seq_id)
        if table is None or table.device != "gpu":
            return
        n_full = min(n_full, len(table.blocks))
        hashes = seq.full_block_hashes(n_full, bs)
        blocks = table.blocks
        cache = self.gpu.cache_block
        for i in range(start, n_full):
            cache(blocks[i], hashes[i])
        seq.num_cached_blocks = n_full

    # ------------------------------------------------------------------ slots
    def num_blocks_needed(self, work: Iterable[tuple[Sequence, int]]) -> int:
        """GPU blocks that ``allocate_slots`` would take for these (sequence, new tokens) pairs, applied in
        order: new blocks plus copy-on-write copies (a shared block written by ``w`` of its holders costs
        ``w`` copies, or ``w - 1`` when they are all its holders: the last one writes in place)."""
        bs = self.block_size
        total = 0
        shared: dict[int, list] = {}
        for seq, k in work:
            if k <= 0:
                continue
            blocks = self.tables[seq.seq_id].blocks
            nb = len(blocks)
            c = seq.num_computed_tokens
            n_end = (c + k + bs - 1) // bs
            if n_end > nb:
                total += n_end - nb
            for idx in range(c // bs, min(nb, n_end)):
                b = blocks[idx]
                if b.ref_cnt > 1:
                    e = shared.get(b.block_id)
                    if e is None:
                        shared[b.block_id] = [b, 1]
                    else:
                        e[1] += 1
        for b, w in shared.values():
            total += w if b.ref_cnt > w else w - 1
        return total

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       copies: list[tuple[int, int]]) -> BlockUpdates | None:
        """Make slots for ``num_new_tokens`` tokens from ``seq.num_computed_tokens`` on.

        Returns the table's changed entries ``[(logical index, physical block)]`` (appended blocks and
        copy-on-write replacements) and appends CoW ``(src, dst)`` pairs to ``copies``; returns None
        (changing nothing) when the GPU pool is short.
        """
        blocks = self.tables[seq.seq_id].blocks
        bs = self.block_size
        c = seq.num_computed_tokens
        n_end = (c + num_new_tokens + bs - 1) // bs
        nb = len(blocks)
        first = c // bs
        # fast path: a decode into an unshared last block
        if n_end <= nb and n_end - first <= 1 and (first >= nb or blocks[first].ref_cnt == 1):
            return []
        cow = [idx for idx in range(first, min(nb, n_end)) if blocks[idx].ref_cnt > 1]
        grow = n_end - nb if n_end > nb else 0
        gpu = self.gpu
        if len(cow) + grow > gpu.free_queue.num_free_blocks:
            return None
        updates = []
        for idx in cow:
            old = blocks[idx]
            if old.ref_cnt == 1:  # (cannot happen for one sequence; kept for safety)
                continue
            new = gpu.get_new_block()
            copies.append((old.block_id, new.block_id))
            gpu.free_block(old)  # ref > 1: only drops our reference
            blocks[idx] = new
            updates.append((idx, new.block_id))
            self.num_cow_copies += 1
        if grow:
            for b in gpu.get_new_blocks(grow):
                updates.append((len(blocks), b.block_id))
                blocks.append(b)
        return updates

    def allocate_group_slots(self, work: list[tuple[Sequence, int]],
                             copies: list[tuple[int, int]]) -> list[BlockUpdates] | None:
        """``allocate_slots`` for several (sequence, new tokens) pairs, all or nothing: the block updates
        of each pair, in order, or None (changing nothing) when the GPU pool cannot hold them all."""
        if len(work) == 1:
            seq, k = work[0]
            ups = self.allocate_slots(seq, k, copies)
            return None if ups is None else [ups]
        if self.num_blocks_needed(work) > self.gpu.free_queue.num_free_blocks:
            return None
        return [self.allocate_slots(seq, k, copies) for seq, k in work]

    # ------------------------------------------------------------------ fork / free
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (ref + 1 each, the partial last block included)."""
        t = self.tables[parent.seq_id]
        if child.seq_id in self.tables:
            raise ValueError(f"sequence {child.seq_id} already has a block table")
        pool = self.gpu if t.device == "gpu" else self.cpu
        pool.touch(t.blocks)
        self.tables[child.seq_id] = BlockTable(child, list(t.blocks), t.device)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first (so a cached chain is evicted tail first)."""
        t = self.tables.pop(seq.seq_id, None)
        if t is None:
            return
        pool = self.gpu if t.device == "gpu" else self.cpu
        pool.free_blocks(reversed(t.blocks))
        seq.num_cached_blocks = 0

    # ------------------------------------------------------------------ swap
    @staticmethod
    def _unique_blocks(tables: Iterable[BlockTable]) -> int:
        seen = set()
        for t in tables:
            for b in t.blocks:
                seen.add(b.block_id)
        return len(seen)

    def num_unique_blocks(self, seqs: Iterable[Sequence]) -> int:
        return self._unique_blocks(self.tables[s.seq_id] for s in seqs if s.seq_id in self.tables)

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self.num_unique_blocks(seqs) <= self.cpu.num_free_blocks

    def can_swap_in(self, seqs: list[Sequence], watermark_blocks: int = 0) -> bool:
        return self.num_unique_blocks(seqs) <= self.gpu.num_free_blocks - watermark_blocks

    def _move(self, seqs: list[Sequence], src: BlockPool, dst: BlockPool, device: str) -> list[tuple[int, int]]:
        mapping: dict[int, KVBlock] = {}
        pairs: list[tuple[int, int]] = []
        for seq in seqs:
            t = self.tables[seq.seq_id]
            assert t.device == src.device, (t.device, src.device)
            new_blocks = []
            for b in t.blocks:
                nb = mapping.get(b.block_id)
                if nb is None:
                    nb = dst.get_new_block()
                    mapping[b.block_id] = nb
                    pairs.append((b.block_id, nb.block_id))
                else:
                    dst.touch((nb,))  # a block shared on the source stays shared on the destination
                new_blocks.append(nb)
            src.free_blocks(reversed(t.blocks))
            t.blocks = new_blocks
            t.device = device
            seq.num_cached_blocks = 0
        return pairs

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks GPU -> CPU; returns ``(gpu block, cpu block)`` copies."""
        if not self.can_swap_out(seqs):
            raise ValueError("not enough CPU blocks to swap out")
        pairs = self._move(seqs, self.gpu, self.cpu, "cpu")
        self.num_swap_out_blocks += len(pairs)
        return pairs

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks CPU -> GPU; returns ``(cpu block, gpu block)`` copies. The full
        computed blocks are offered to the prefix cache again."""
        if not self.can_swap_in(seqs):
            raise ValueError("not enough GPU blocks to swap in")
        pairs = self._move(seqs, self.cpu, self.gpu, "gpu")
        self.num_swap_in_blocks += len(pairs)
        for seq in seqs:
            self.cache_computed_blocks(seq)
        return pairs

    # ------------------------------------------------------------------ introspection
    def slot_usage(self) -> tuple[int, int]:
        """(allocated GPU token slots, slots holding a computed token), shared blocks counted once."""
        bs = self.block_size
        partial: dict[int, int] = {}
        for t in self.tables.values():
            if t.device != "gpu":
                continue
            c = t.seq.num_computed_tokens
            blocks = t.blocks
            for idx in range(c // bs, len(blocks)):
                fill = c - idx * bs
                if fill < 0:
                    fill = 0
                bid = blocks[idx].block_id
                if partial.get(bid, -1) < fill:
                    partial[bid] = fill
        allocated = self.gpu.num_used_blocks * bs
        waste = sum(bs - f for f in partial.values())
        return allocated, allocated - waste

    def holders(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(gpu block id -> holder seq ids, cpu block id -> holder seq ids)."""
        g: dict[int, list[int]] = {}
        c: dict[int, list[int]] = {}
        for sid, t in self.tables.items():
            d = g if t.device == "gpu" else c
            for b in t.blocks:
                d.setdefault(b.block_id, []).append(sid)
        return g, c

    def check_invariants(self) -> None:
        """AssertionError when a block's ref count differs from the number of tables holding it, a held
        block is on the free queue, or free + held != total."""
        self.gpu.check_invariants()
        self.cpu.check_invariants()
        for pool, device in ((self.gpu, "gpu"), (self.cpu, "cpu")):
            count = [0] * pool.num_blocks
            for t in self.tables.values():
                if t.device == device:
                    for b in t.blocks:
                        assert pool.blocks[b.block_id] is b, f"foreign block {b.block_id} in a {device} table"
                        count[b.block_id] += 1
            held = 0
            for b in pool.blocks:
                assert b.ref_cnt == count[b.block_id], (
                    f"{device} block {b.block_id}: ref_cnt {b.ref_cnt} but held by {count[b.block_id]} tables")
                if count[b.block_id]:
                    held += 1
                    assert not pool.free_queue.contains(b), f"{device} block {b.block_id} both free and held"
            assert held + pool.num_free_blocks == pool.num_blocks, (device, held, pool.num_free_blocks)
