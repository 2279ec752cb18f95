"""From a step's sampled tokens and logprobs to its StepResult: one SequenceOutput per sampled sequence (a
fork child's too) and per prompt-logprob chunk, in the order of the plan's scheduled entries."""

from __future__ import annotations

import time

from gpu_worker.input_batch import SeqState
from protocol import SequenceOutput, StepPlan, StepResult, TokenLogprob


def token_logprobs(pairs) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=int(t), logprob=float(v)) for t, v in pairs]


class StepOutputs:
    """The outputs of one step, by scheduled entry: a prompt-logprob output can be completed by the token
    its entry samples in the same step; a parent's fork children add theirs after it."""

    def __init__(self) -> None:
        self.by_entry: dict[int, SequenceOutput | list[SequenceOutput]] = {}

    def prompt_logprobs(self, i: int, s: SeqState, entries: list[list[TokenLogprob] | None]) -> None:
        self.by_entry[i] = SequenceOutput(seq_id=s.seq_id, prompt_logprobs=entries)

    def sampled(self, i: int, s: SeqState, is_entry_state: bool, token: int, logprob: float | None,
                top: list[tuple[int, float]] | None) -> None:
        so = SequenceOutput(seq_id=s.seq_id, token_id=token, logprob=logprob,
                            top_logprobs=None if top is None else token_logprobs(top))
        prev = self.by_entry.get(i)
        if is_entry_state and isinstance(prev, SequenceOutput):
            prev.token_id, prev.logprob, prev.top_logprobs = so.token_id, so.logprob, so.top_logprobs
        elif prev is None:
            self.by_entry[i] = so
        elif isinstance(prev, list):
            prev.append(so)
        else:
            self.by_entry[i] = [prev, so]

    def in_plan_order(self) -> list[SequenceOutput]:
        res: list[SequenceOutput] = []
        for i in sorted(self.by_entry):
            o = self.by_entry[i]
            if isinstance(o, list):
                res.extend(o)
            else:
                res.append(o)
        return res


def step_result(plan: StepPlan, worker_id: str, outputs: list[SequenceOutput], t0: float) -> StepResult:
    return StepResult(version=plan.version, worker_id=worker_id, step_id=plan.step_id, outputs=outputs,
                      execute_ms=(time.perf_counter() - t0) * 1e3, error=None)
