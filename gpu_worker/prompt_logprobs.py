"""Prompt logprobs of a step's prefill chunks (vLLM's ``prompt_logprobs``, the OpenAI ``echo``): which logits
rows give them, and the per-chunk outputs, stitched across chunk boundaries."""

from __future__ import annotations

import torch

from gpu_worker.input_batch import StepInputs
from gpu_worker.sampler import prompt_logprobs
from gpu_worker.step_outputs import StepOutputs, token_logprobs
from protocol import TokenLogprob


def prompt_logprob_rows(x: StepInputs, rows: list[int]) -> list[tuple[int, int, int, int]]:
    """Append to ``rows`` the hidden rows whose logits give prompt logprobs; per entry that has some:
    (entry, first row in ``rows``, count, first target position)."""
    plp: list[tuple[int, int, int, int]] = []
    for i, s in enumerate(x.states):
        if s.sampling.prompt_logprobs is None:
            continue
        c = int(x.starts[i])
        if c >= s.prompt_len:
            continue
        hi = min(c + int(x.qlens[i]), s.prompt_len - 1)  # positions p in [c, hi) predict prompt token p + 1
        if hi > c:
            plp.append((i, len(rows), hi - c, c + 1))
            base = int(x.qsl[i]) - c
            rows.extend(range(base + c, base + hi))
    return plp


def prompt_logprob_outputs(logits, plp, plp_entries, x: StepInputs, out: StepOutputs) -> None:
    """Each prompt-logprob entry's logprobs of this chunk's prompt tokens, into ``out``."""
    states = x.states
    computed: dict[int, list[list[TokenLogprob]]] = {}
    for (i, r0, cnt, t0) in plp:
        s = states[i]
        tgt = torch.tensor(s.token_ids[t0: t0 + cnt], device=logits.device)
        computed[i] = [token_logprobs(e)
                       for e in prompt_logprobs(logits[r0: r0 + cnt], tgt, s.sampling.prompt_logprobs)]
    for i in plp_entries:
        s = states[i]
        c, n = int(x.starts[i]), int(x.qlens[i])
        end = min(c + n, s.prompt_len)
        got = computed.get(i, [])
        # one entry per prompt token j in [c, end): token c's entry was computed from the previous
        # chunk's last row (pending; None for the first prompt token), the others from this chunk;
        # this chunk's last row gives the pending entry of the next chunk's first token.
        first = None if c == 0 else s.pending_prompt_lp
        s.pending_prompt_lp = got[end - c - 1] if len(got) > end - c - 1 else None
        out.prompt_logprobs(i, s, [first] + got[: end - c - 1])
