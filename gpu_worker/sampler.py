"""Token sampling for a batch of logits rows.

Per row, in order (vLLM's semantics, HF's warpers):

1. raw logprobs (``log_softmax`` of the unprocessed logits, vLLM's default) for rows that asked for
   logprobs: the sampled token's logprob and the top-k;
2. penalties: repetition (HF: over prompt + output tokens, ``l < 0 ? l * p : l / p``), then frequency
   and presence (OpenAI: over output tokens, ``l -= f * count + p * (count > 0)``);
3. ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` masked while fewer outputs exist;
   ``logit_bias`` added; a structured output's token bitmask (gpu_worker/structured_output.py) applied to
   the whole batch in one op;
4. greedy rows (temperature 0, beam search): one argmax over all of them;
5. the other rows: temperature, top-k, top-p, min-p (HF's order and definitions), softmax, then an
   inverse-CDF draw with ``u`` from a stable hash of (seed, seq_index, output position): the token a
   sequence draws at position p does not depend on batching, preemption or the worker.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from gpu_worker.sampling_slots import RowParams
from protocol.sampling import SamplingParams


def counter_uniform(seed: int, seq_index: int, position: int) -> float:
    """A uniform in [0, 1) from (seed, seq_index, position): the counter-based random stream."""
    h = hashlib.blake2b(struct.pack("<QQQ", seed & (2**64 - 1), seq_index & (2**64 - 1), position & (2**64 - 1)),
                        digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))


@dataclass
class SampleRequest:
    params: SamplingParams
    seed: int
    seq_index: int
    output_pos: int  # number of output tokens the sequence already has (the position being drawn)
    token_ids: Sequence[int] = ()  # prompt + output tokens (only read when a penalty is set, without history)
    prompt_len: int = 0
    history_slot: int = -1  # its row in the state's PenaltyHistories (-1: from token_ids)
    param_row: int = -1  # its column in the state's SamplingSlots (-1: tensors built from params)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int] = ()):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: Sequence[SampleRequest]) -> SamplerOutput:
        return self.sample(logits, reqs)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: Sequence[SampleRequest], state=None, grammar=None) -> SamplerOutput:
        """``state``: the worker's persistent per-sequence state (an InputBatch): requests with a
        ``history_slot`` read their token history from its ``histories`` (the runner syncs them first), and
        those with a ``param_row`` their parameter tensors from its ``sampling_slots``. ``grammar``: the
        step's constrained rows (a structured_output.GrammarStep), masked here and advanced by the caller."""
        R, V = logits.shape
        assert R == len(reqs)
        dev = logits.device
        logits = logits.float()
        params = [r.params for r in reqs]

        # 1. raw logprobs for the rows that want them
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None or p.use_beam_search]
        raw_lp = None
        if lp_rows:
            idx = torch.tensor(lp_rows, device=dev) if len(lp_rows) < R else None
            raw_lp = torch.log_softmax(logits if idx is None else logits.index_select(0, idx), dim=-1)

        # 2.-3. penalties and min_tokens (on a copy: the raw rows stay for the logprobs)
        processed = self.process_logits(logits, reqs, state)
        if grammar is not None:
            if processed is logits:
                processed = logits.clone()
            grammar.mask(processed)
        logits = processed

        tokens = torch.empty(R, dtype=torch.long, device=dev)
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0 or p.use_beam_search]
        rand = [i for i, p in enumerate(params) if not (p.temperature == 0.0 or p.use_beam_search)]
        if greedy:
            if len(greedy) == R:
                tokens = logits.argmax(dim=-1)
            else:
                gi = torch.tensor(greedy, device=dev)
                tokens[gi] = logits.index_select(0, gi).argmax(dim=-1)
        if rand:
            ri = torch.tensor(rand, device=dev) if len(rand) < R else None
            sub = logits if ri is None else logits.index_select(0, ri)
            drawn = self._sample_random(sub, [reqs[i] for i in rand], state)
            if ri is None:
                tokens = drawn
            else:
                tokens[ri] = drawn

        token_list = tokens.tolist()
        out_lp: list[float | None] = [None] * R
        out_top: list[list[tuple[int, float]] | None] = [None] * R
        if raw_lp is not None:
            sel = torch.tensor([token_list[i] for i in lp_rows], device=dev)
            chosen = raw_lp.gather(1, sel[:, None])[:, 0].tolist()
            kmax = max(params[i].num_logprobs_needed for i in lp_rows)
            if kmax > 0:
                tv, ti = raw_lp.topk(min(kmax, V), dim=-1)
                tv, ti = tv.tolist(), ti.tolist()
            for j, i in enumerate(lp_rows):
                out_lp[i] = chosen[j]
                k = params[i].num_logprobs_needed
                out_top[i] = list(zip(ti[j][:k], tv[j][:k])) if k > 0 else []
        return SamplerOutput(token_ids=token_list, logprobs=out_lp, top_logprobs=out_top)

    @torch.inference_mode()
    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids (int64, on the logits' device) of rows that are greedy with no penalty, min_tokens mask
        or logprobs: exactly what ``sample`` returns for such rows, with one argmax and no host sync."""
        return logits.argmax(dim=-1)  # bf16 -> float32 is exact: the same argmax, without a float copy

    # ---- pieces ------------------------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, reqs: Sequence[SampleRequest], state=None) -> torch.Tensor:
        """Penalties and min_tokens masking; returns ``logits`` itself when nothing applies, else a copy."""
        dev = logits.device
        V = logits.shape[1]
        params = [r.params for r in reqs]
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        min_rows = [i for i, (r, p) in enumerate(zip(reqs, params)) if r.output_pos < p.min_tokens]
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if not (pen_rows or min_rows or bias_rows):
            return logits
        logits = logits.clone()
        if bias_rows:
            _add_logit_bias(logits, [params[i].logit_bias for i in bias_rows], bias_rows)
        if pen_rows:
            self._apply_penalties(logits, [reqs[i] for i in pen_rows], pen_rows, state)
        if min_rows:
            rr, cc = [], []
            for i in min_rows:
                p = params[i]
                stops = set(p.stop_token_ids)
                if not p.ignore_eos:
                    stops.update(self.eos_token_ids)
                for t in stops:
                    if 0 <= t < V:
                        rr.append(i)
                        cc.append(t)
            if rr:
                logits[torch.tensor(rr, device=dev), torch.tensor(cc, device=dev)] = float("-inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[SampleRequest], rows: list[int], state) -> None:
        dev = logits.device
        ri = torch.tensor(rows, device=dev)
        sub = logits.index_select(0, ri)
        rp = _row_params(reqs, state, dev)
        rep = rp.get("repetition_penalty")[:, None]
        kept = state is not None and all(r.history_slot >= 0 for r in reqs)
        histories = state.histories if kept else None
        slots = torch.tensor([r.history_slot for r in reqs], device=dev) if kept else None
        if (rep != 1.0).any():
            seen = histories.seen.index_select(0, slots) if kept else _histories(reqs, logits.shape[1], dev, False)
            pen = torch.where(sub < 0, sub * rep, sub / rep)
            sub = torch.where(seen, pen, sub)
        freq = rp.get("frequency_penalty")[:, None]
        pres = rp.get("presence_penalty")[:, None]
        if (freq != 0).any() or (pres != 0).any():
            counts = histories.counts.index_select(0, slots) if kept else _histories(reqs, logits.shape[1], dev, True)
            sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        logits[ri] = sub

    def _sample_random(self, logits: torch.Tensor, reqs: list[SampleRequest], state=None) -> torch.Tensor:
        probs = self.warped_probs(logits, [r.params for r in reqs], _row_params(reqs, state, logits.device))
        dev = logits.device
        V = logits.shape[1]
        u = torch.tensor([counter_uniform(r.seed, r.seq_index, r.output_pos) for r in reqs],
                         device=dev, dtype=torch.float64)[:, None]
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        x = u * cdf[:, -1:]
        tok = torch.searchsorted(cdf, x, right=True)[:, 0]
        return tok.clamp_(max=V - 1)

    @staticmethod
    def warped_probs(logits: torch.Tensor, ps: Sequence[SamplingParams], rp: RowParams | None = None) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p (HF's order and definitions) -> probabilities [R, V].
        Rows must have temperature > 0. ``rp``: the rows' parameter tensors (default: built from ``ps``)."""
        dev = logits.device
        R, V = logits.shape
        rp = rp if rp is not None else RowParams(ps, dev)
        temp = rp.get("temperature", logits.dtype)[:, None]
        logits = logits / temp
        ks = [p.top_k if 0 < p.top_k < V else 0 for p in ps]
        tps = [p.top_p for p in ps]
        cut = [i for i in range(R) if ks[i] > 0 or tps[i] < 1.0]
        if cut:
            ci = torch.tensor(cut, device=dev)
            sub = logits.index_select(0, ci)
            k = torch.tensor([ks[i] for i in cut], device=dev)
            tp = rp.get("top_p", logits.dtype).index_select(0, ci)
            # Only the top K candidates can survive top-k; for top-p alone, when their mass reaches top_p
            # (checked per row; the rest fall back to a full sort). topk is far cheaper than a full sort.
            K = min(V, max(max(ks[i] for i in cut), _CANDIDATES))
            new, ok = _top_k_top_p(sub, k, tp, K)
            if not bool(ok.all()):
                bad = (~ok).nonzero()[:, 0]
                new[bad] = _top_k_top_p(sub[bad], k[bad], tp[bad], V)[0]
            logits[ci] = new
        mp = rp.get("min_p", logits.dtype)[:, None]
        probs = logits.softmax(dim=-1)
        if (mp > 0).any():
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < mp * top, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs


_CANDIDATES = 1024


def _add_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]], rows: list[int]) -> None:
    """OpenAI's logit_bias: each row's biases added to its logits (one index_put for all rows)."""
    V = logits.shape[1]
    rr, cc, vv = [], [], []
    for i, b in zip(rows, biases):
        for t, v in b.items():
            if t < V:
                rr.append(i)
                cc.append(t)
                vv.append(v)
    if rr:
        dev = logits.device
        logits.index_put_((torch.tensor(rr, device=dev), torch.tensor(cc, device=dev)),
                          torch.tensor(vv, dtype=logits.dtype, device=dev), accumulate=True)


def _row_params(reqs: Sequence[SampleRequest], state, dev: torch.device) -> RowParams:
    """The requests' parameter tensors: gathered from the state's SamplingSlots when they all have a column
    there (one index upload), else built from their params."""
    params = [r.params for r in reqs]
    if state is not None and all(r.param_row >= 0 for r in reqs):
        return RowParams(params, dev, state.sampling_slots, torch.tensor([r.param_row for r in reqs], device=dev))
    return RowParams(params, dev)


def _histories(reqs: list[SampleRequest], V: int, dev: torch.device, output_counts: bool) -> torch.Tensor:
    """From the requests' token lists: ``seen`` [n, V] bool (prompt + output tokens), or with
    ``output_counts`` the float32 counts [n, V] of the output tokens; what PenaltyHistories keeps."""
    toks, rows = [], []
    for j, r in enumerate(reqs):
        t = np.asarray(r.token_ids, dtype=np.int64)
        if output_counts:
            t = t[r.prompt_len:]
        toks.append(t)
        rows.append(np.full(len(t), j, dtype=np.int64))
    t = torch.from_numpy(np.concatenate(toks)).to(dev)
    rr = torch.from_numpy(np.concatenate(rows)).to(dev)
    keep = (t >= 0) & (t < V)
    if not output_counts:
        seen = torch.zeros(len(reqs), V, dtype=torch.bool, device=dev)
        seen[rr[keep], t[keep]] = True
        return seen
    counts = torch.zeros(len(reqs), V, dtype=torch.float32, device=dev)
    counts.index_put_((rr[keep], t[keep]), torch.ones(int(keep.sum()), dtype=torch.float32, device=dev),
                      accumulate=True)
    return counts


def _top_k_top_p(sub: torch.Tensor, k: torch.Tensor, tp: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's TopK then TopP warpers over the K best candidates of each row. Returns the filtered logits
    (-inf outside the kept set) and, per row, whether K candidates were enough."""
    V = sub.shape[1]
    if K < V:
        sv, si = sub.topk(K, dim=-1)
    else:
        sv, si = sub.sort(dim=-1, descending=True)
    has_k = k > 0
    if bool(has_k.any()):
        kth = sv.gather(1, (k.clamp(1, K) - 1)[:, None])
        sv = sv.masked_fill((sv < kth) & has_k[:, None], float("-inf"))
    ok = torch.ones(sub.shape[0], dtype=torch.bool, device=sub.device)
    has_p = tp < 1.0
    if bool(has_p.any()):
        # normaliser: the top-k set when top-k is on (inside the candidates), else the whole row
        lse = torch.where(has_k, torch.logsumexp(sv, dim=-1), torch.logsumexp(sub, dim=-1))
        probs = (sv - lse[:, None]).exp()
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly better-ranked tokens
        rm_p = (before >= tp[:, None]) & has_p[:, None]
        rm_p[:, 0] = False
        sv = sv.masked_fill(rm_p, float("-inf"))
        if K < V:
            ok = has_k | ~has_p | (probs.sum(dim=-1) >= tp)
    out = torch.full_like(sub, float("-inf")).scatter_(1, si, sv)
    return out, ok


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row: [(target token, its logprob)] + the top-k (target excluded), from raw logits."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, target_ids[:, None])[:, 0].tolist()
    tgt = target_ids.tolist()
    if k > 0:
        tv, ti = lp.topk(min(k + 1, lp.shape[1]), dim=-1)
        tv, ti = tv.tolist(), ti.tolist()
    out = []
    for r in range(len(tgt)):
        entry = [(tgt[r], chosen[r])]
        if k > 0:
            entry += [(t, v) for t, v in zip(ti[r], tv[r]) if t != tgt[r]][:k]
        out.append(entry)
    return out
