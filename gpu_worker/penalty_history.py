"""Token histories of the sequences that use a repetition, frequency or presence penalty, kept on the device.

Per such sequence one row of two tensors: ``seen[row, t]`` (token t occurs in its prompt or output: the
repetition penalty) and ``counts[row, t]`` (how often t occurs in its output: the frequency and presence
penalties). A row is brought up to date before each sampling with only the tokens added since the last
(usually one), in one batched scatter for the whole step, instead of re-uploading every history every
step. The tensors are allocated on first use and grow by doubling; sequences without a penalty cost nothing.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch



class PenaltyHistories:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self.free: list[int] = []

    def alloc(self, live_slots: Callable[[], Iterable[int]]) -> int:
        """A free row; rows of sequences dropped without ``release`` (``runner.seqs.clear()``) are reclaimed
        when the free list runs dry."""
        if not self.free:
            n = self.seen.shape[0]
            live = set(live_slots())
            self.free = [r for r in range(n - 1, -1, -1) if r not in live]
            if len(self.free) < max(1, n // 4):
                grow = max(n, 8)
                self.seen = torch.cat([self.seen, self.seen.new_zeros((grow, self.vocab_size))])
                self.counts = torch.cat([self.counts, self.counts.new_zeros((grow, self.vocab_size))])
                self.free = list(range(n + grow - 1, n - 1, -1)) + self.free
        return self.free.pop()

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free.append(slot)

    def sync(self, states: list, live_slots: Callable[[], Iterable[int]]) -> None:
        """Record in each state's row (``states``: input_batch.SeqState) the tokens it gained since the last
        sync (all of them the first time)."""
        fresh, slots, toks, out = [], [], [], []
        for s in states:
            if s.pen_slot < 0:
                s.pen_slot, s.pen_len = self.alloc(live_slots), 0
            if s.pen_len == 0:
                fresh.append(s.pen_slot)
            new = s.token_ids[s.pen_len:]
            if new:
                slots.append(np.full(len(new), s.pen_slot, dtype=np.int64))
                toks.append(np.asarray(new, dtype=np.int64))
                out.append(np.arange(s.pen_len, len(s.token_ids)) >= s.prompt_len)  # output tokens are counted
            s.pen_len = len(s.token_ids)
        dev = self.device
        if fresh:
            f = torch.tensor(fresh, device=dev)
            self.seen[f] = False
            self.counts[f] = 0.0
        if not toks:
            return
        t = torch.from_numpy(np.concatenate(toks)).to(dev)
        r = torch.from_numpy(np.concatenate(slots)).to(dev)
        o = torch.from_numpy(np.concatenate(out)).to(dev)
        keep = (t >= 0) & (t < self.vocab_size)
        self.seen[r[keep], t[keep]] = True
        c = keep & o
        self.counts.index_put_((r[c], t[c]), torch.ones(int(c.sum()), dtype=self.counts.dtype, device=dev),
                               accumulate=True)
