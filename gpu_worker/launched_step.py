"""A step the ModelRunner has launched (``ModelRunner.launch``), and the tokens it left on the device.

A greedy step does not wait for its sampled tokens: the argmax stays on the device, one device-to-host copy
of them is queued behind it, and ``launch`` returns a ``DeferredStep`` at once. The next step can be launched
before that copy lands: a decode entry whose input is such a token reads it on the device
(``StepInputs.pending_rows``, gathered in ``ModelRunner._forward``), so the GPU runs step N+1 right behind
step N while the host builds step N's result (vLLM V1's async scheduling). A greedy step with grammars
too: the bitmasks are applied on the device, and each grammar consumes its token later, when the fill of
the next step's masks needs it. Every other step (random sampling, logprobs, penalties, beam search,
forks) syncs as before and comes back as a ``DoneStep``.

Until it is resolved, a deferred step's sequences lack their newest token in ``SeqState.token_ids``
(``SeqState.pending`` names the step). ``PendingTokens`` resolves the steps in launch order (appending
each step's tokens), under one lock: the worker service takes results on its publishing thread while the
main thread launches the next plan.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Callable

import torch

from gpu_worker.step_outputs import step_result
from protocol import SequenceOutput, StepPlan, StepResult

if TYPE_CHECKING:
    from gpu_worker.input_batch import SeqState


class DoneStep:
    """A step whose result is already known (it synced, or it sampled nothing)."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result


class DeferredStep:
    """A launched greedy step: ``states[j]`` receives ``tokens[j]`` (on the device until resolved).

    ``finish``, when given, computes the tokens later, when first needed (the next step's input gather, a
    result, a grammar that consumes them): a step with grammars applies its bitmasks then, so the host plans
    and launches the next step while the masks are being filled."""

    def __init__(self, owner: "PendingTokens", plan: StepPlan, worker_id: str, t0: float,
                 states: list["SeqState"], tokens: torch.Tensor | None,
                 finish: Callable[[], torch.Tensor] | None = None):
        self.owner, self.plan, self.worker_id, self.t0 = owner, plan, worker_id, t0
        self.states = states
        self._finish, self._finish_lock = finish, threading.Lock()
        self._tokens: torch.Tensor | None = None
        self._host: list[int] | None = None
        self.resolved = False
        for j, s in enumerate(states):
            s.pending, s.pending_idx = self, j
        if tokens is not None:
            self._start_copy(tokens)

    def _start_copy(self, tokens: torch.Tensor) -> None:
        if tokens.device.type == "cuda":
            self._pinned = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._pinned.copy_(tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._pinned, self._copied = tokens, None
        self._tokens = tokens  # last: another thread reads it without the lock

    @property
    def tokens(self) -> torch.Tensor:
        """int64 [len(states)] on the device: the next step may gather from it."""
        if self._tokens is None:
            with self._finish_lock:
                if self._tokens is None:
                    tokens = self._finish()  # this step's masks came first: then its grammars take its tokens
                    for j, s in enumerate(self.states):
                        if s.grammar is not None:  # consumed when the next step's mask needs it
                            s.grammar.feed_later(self, j)
                    self._start_copy(tokens)
                    self._finish = None
        return self._tokens

    def host_tokens(self) -> list[int]:
        """Wait for the copy (not for later steps) and return the tokens as ints."""
        if self._host is None:
            self.tokens
            if self._copied is not None:
                self._copied.synchronize()
            self._host = self._pinned.tolist()
        return self._host

    def _apply(self) -> None:
        """Append the tokens to their sequences (in launch order: PendingTokens calls it)."""
        for s, tok in zip(self.states, self.host_tokens()):
            s.token_ids.append(tok)
            if s.pending is self:
                s.pending = None
        self.resolved = True

    def result(self) -> StepResult:
        toks = self.host_tokens()  # the wait, outside the lock
        self.owner.resolve_through(self)
        outputs = [SequenceOutput(seq_id=s.seq_id, token_id=t) for s, t in zip(self.states, toks)]
        return step_result(self.plan, self.worker_id, outputs, self.t0)


class PendingTokens:
    """The deferred steps not yet resolved, oldest first, and the lock that orders resolving and launching."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._steps: collections.deque[DeferredStep] = collections.deque()

    def add(self, step: DeferredStep) -> None:
        self._steps.append(step)

    def resolve_through(self, step: DeferredStep) -> None:
        with self.lock:
            while not step.resolved and self._steps:
                self._steps.popleft()._apply()

    def resolve_all(self, keep_latest: bool = False) -> None:
        """Resolve every deferred step (``keep_latest``: all but the newest, which the next step may read)."""
        with self.lock:
            while len(self._steps) > (1 if keep_latest else 0):
                self._steps.popleft()._apply()

    def finish_all(self) -> None:
        """Compute every deferred step's tokens (their grammars' matchers then know of them)."""
        with self.lock:
            for step in self._steps:
                step.tokens

    def clear(self) -> None:
        with self.lock:
            self._steps.clear()
