"""Structured outputs on the worker: grammars compiled off the step loop, token bitmasks applied batched.

A request's ``SamplingParams.structured_output`` is compiled (model_io/grammar.py: llguidance, cached by
spec, in a thread pool) when its sequence first appears in a step, while the forward pass runs. Per step,
``GrammarMasks`` fills the bitmasks of every constrained sequence in one parallel call, in a thread,
while the forward pass runs; ``GrammarStep.mask`` applies them to the whole logits batch with one tensor
op; after sampling, ``advance`` feeds each constrained sequence its token. A greedy step leaves its tokens
on the device (gpu_worker/launched_step.py): each sequence's grammar then takes its token when the next
step's fill needs it (``SeqGrammar.feed_later``), in the fill thread, while the next forward pass runs. A finished grammar allows only
EOS, so the sequence stops; a matcher in error (never expected: the mask forbids what it would reject) does the same.
Steps without a constrained row never reach this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from model_io.grammar import SeqGrammar, matchers_of


class GrammarMasks:
    """The token bitmasks of a step's constrained sequences (by seq id), filled in a thread while the
    forward pass runs: they depend only on the tokens each sequence has so far, and filling them for a
    batch of 256 takes milliseconds that would otherwise follow the forward pass."""

    def __init__(self, grammars: dict[int, SeqGrammar], vocab_size: int):
        self.index = {sid: i for i, sid in enumerate(grammars)}
        self.future = _fill_pool().submit(self._fill, list(grammars.values()), vocab_size)

    @staticmethod
    def _fill(grammars: list[SeqGrammar], vocab_size: int) -> torch.Tensor:
        import llguidance.torch as lt

        matchers = matchers_of(grammars, _executor())  # may wait for a compile: here, not on the step loop
        bitmask = torch.full(lt.get_bitmask_shape(len(matchers), vocab_size), -1, dtype=torch.int32)
        live = [(m, i) for i, m in enumerate(matchers) if not m.is_error()]
        if live:
            lt.fill_next_token_bitmask_par(_executor(), live, bitmask)
        return bitmask


class GrammarStep:
    """The constrained rows of one sampling step: ``rows`` of the logits and their sequences' grammars;
    ``src``: each row's sequence in ``masks`` (a fork child shares its parent's, filled before the fork)."""

    def __init__(self, rows: list[int], grammars: list[SeqGrammar], eos_token_ids: Sequence[int],
                 masks: GrammarMasks | None = None, src: list[int] | None = None):
        self.rows = rows
        self.matchers = [g.matcher() for g in grammars]
        self.eos = list(eos_token_ids)
        self.masks, self.src = masks, src

    def mask(self, logits: torch.Tensor) -> None:
        """Every constrained row's bitmask (filled ahead, or now in one parallel call), applied to the batch
        in place (one op)."""
        import llguidance.torch as lt

        R, V = logits.shape
        bitmask = torch.full(lt.get_bitmask_shape(R, V), -1, dtype=torch.int32)  # unconstrained rows: all allowed
        ahead = self.masks.future.result() if self.masks is not None else None
        if ahead is not None and ahead.shape[1] == bitmask.shape[1]:
            bitmask[torch.tensor(self.rows)] = ahead[torch.tensor(self.src)]
        else:  # not filled ahead (or for another width of logits): fill now
            live = [(m, r) for m, r in zip(self.matchers, self.rows) if not m.is_error()]
            if live:
                lt.fill_next_token_bitmask_par(_executor(), live, bitmask)
        words = bitmask.numpy().view(np.uint32)
        for m, r in zip(self.matchers, self.rows):
            if m.is_error():  # only EOS
                words[r] = 0
                for e in self.eos:
                    words[r, e // 32] |= np.uint32(1 << (e % 32))
        if logits.device.type == "cuda":  # pinned: a copy from pageable memory may wait for the GPU
            bitmask = bitmask.pin_memory()
        apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True))

    def advance(self, tokens: Sequence[int]) -> None:
        """Feed each constrained row's sampled token (``tokens``: the step's tokens, by row)."""
        for m, r in zip(self.matchers, self.rows):
            if not m.is_error():
                m.consume_token(tokens[r])


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """``logits[r, t] = -inf`` where bit ``t % 32`` of ``bitmask[r, t // 32]`` is 0, in place, in a few
    elementwise ops (llguidance's own applier is a torch.compile'd function: its first call compiles for
    seconds on the step loop, and every call pays the compiled function's guards)."""
    R, V = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(R, -1)[:, :V]
    logits.masked_fill_(allowed == 0, float("-inf"))
    if V > allowed.shape[1]:  # ids past the mask's width: never allowed
        logits[:, allowed.shape[1]:] = float("-inf")


_FILL_POOL = None


def _fill_pool():
    global _FILL_POOL
    if _FILL_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _FILL_POOL = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
    return _FILL_POOL


_EXECUTOR = None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR
