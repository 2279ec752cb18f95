"""Sampler on synthetic logits, against HF transformers' logits processors where they exist."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.sampler import Sampler, SampleRequest, counter_uniform, prompt_logprobs
from protocol import SamplingParams

V = 3000  # > the sampler's 1024 top-k/top-p candidates: the fast path is exercised


def _logits(rows=4, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _req(p, seed=0, idx=0, pos=0, tokens=(), prompt_len=0):
    return SampleRequest(params=p, seed=seed, seq_index=idx, output_pos=pos, token_ids=list(tokens),
                         prompt_len=prompt_len)


def test_greedy_rows_argmax_and_mixed_batch():
    s = Sampler(V, [2])
    x = _logits(5)
    ps = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
          SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.0)]
    out = s.sample(x, [_req(p, seed=i) for i, p in enumerate(ps)])
    for i in (0, 2, 4):
        assert out.token_ids[i] == int(x[i].argmax())
    assert int(out.token_ids[3]) in x[3].topk(5).indices.tolist()
    assert out.logprobs == [None] * 5


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=20),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, top_k=50, top_p=0.6),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.5, top_k=100, top_p=0.95, min_p=0.02),
])
def test_warped_probs_match_hf_warpers(kw):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    p = SamplingParams(**kw)
    x = _logits(3, seed=1)
    procs = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    ref = procs(torch.zeros(3, 1, dtype=torch.long), x.clone()).softmax(-1)
    ours = Sampler.warped_probs(x, [p] * 3)
    assert torch.equal(ours > 0, ref > 0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_draws_follow_the_distribution_and_are_counter_based():
    s = Sampler(8)
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 1.5]])
    p = SamplingParams(temperature=1.0)
    n = 4000
    reqs = [_req(p, seed=5, idx=0, pos=i) for i in range(n)]
    toks = torch.tensor(s.sample(x.expand(n, 8), reqs).token_ids)
    freq = torch.bincount(toks, minlength=8).float() / n
    assert (freq - x[0].softmax(-1)).abs().max() < 0.03
    # the same (seed, seq_index, position) gives the same token in any batch, in any row
    again = s.sample(x.expand(3, 8), [reqs[17], reqs[3], reqs[999]]).token_ids
    assert again == [int(toks[17]), int(toks[3]), int(toks[999])]
    assert counter_uniform(5, 0, 1) != counter_uniform(5, 1, 1) != counter_uniform(6, 0, 1)


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    s = Sampler(V)
    x = _logits(2, seed=2)
    prompt, out = [5, 17, 17, 900, 3], [42, 5, 7]
    p = SamplingParams(temperature=0.0, repetition_penalty=1.7)
    ours = s.process_logits(x, [_req(p, tokens=prompt + out, prompt_len=5), _req(SamplingParams())])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), x[:1].clone())
    torch.testing.assert_close(ours[:1], ref)
    assert torch.equal(ours[1], x[1])  # a row without penalties is untouched


def test_frequency_and_presence_penalties_over_output_only():
    s = Sampler(V)
    x = _logits(1, seed=3)
    prompt, out = [10, 11, 12], [11, 11, 20]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    ours = s.process_logits(x, [_req(p, tokens=prompt + out, prompt_len=3)])[0]
    ref = x[0].clone()
    ref[11] -= 2 * 0.5 + 0.25
    ref[20] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(ours, ref)  # token 10 and 12 (prompt only) untouched


def test_min_tokens_masks_eos_and_stop_ids():
    s = Sampler(V, eos_token_ids=[2])
    x = torch.zeros(3, V)
    x[:, 2] = 10.0
    x[:, 7] = 9.0
    x[:, 8] = 8.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    out = s.sample(x, [_req(p, pos=0), _req(p, pos=3),
                       _req(p.model_copy(update={"ignore_eos": True}), pos=1)]).token_ids
    assert out == [8, 2, 2]


def test_logprobs_are_raw_and_topk():
    s = Sampler(V)
    x = _logits(2, seed=4)
    p = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0)
    out = s.sample(x, [_req(p, tokens=[int(x[0].argmax())], prompt_len=1), _req(SamplingParams(logprobs=0))])
    raw = torch.log_softmax(x, -1)
    assert out.token_ids[0] != int(x[0].argmax())  # the penalty moved the choice...
    assert out.logprobs[0] == pytest.approx(float(raw[0, out.token_ids[0]]), abs=1e-6)  # ...not the logprobs
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(3).indices.tolist()
    assert out.top_logprobs[1] == [] and out.logprobs[1] == pytest.approx(float(raw[1, out.token_ids[1]]), abs=1e-6)


def test_prompt_logprobs_helper():
    x = _logits(3, seed=5)
    tgt = torch.tensor([4, int(x[1].argmax()), 9])
    out = prompt_logprobs(x, tgt, 2)
    raw = torch.log_softmax(x, -1)
    for r in range(3):
        assert out[r][0][0] == int(tgt[r]) and out[r][0][1] == pytest.approx(float(raw[r, tgt[r]]), abs=1e-6)
        assert len(out[r]) == 3 and len({t for t, _ in out[r]}) == 3


def test_top_p_over_a_flat_distribution_falls_back_to_the_full_sort():
    """top_p over more than the 1024 candidates of the fast path still matches HF."""
    from transformers.generation.logits_process import TopPLogitsWarper

    V2 = 5000
    x = torch.randn(2, V2, generator=torch.Generator().manual_seed(9)) * 0.1  # nearly flat
    x[1] *= 40  # peaked: the fast path suffices
    p = SamplingParams(temperature=1.0, top_p=0.9)
    ref = TopPLogitsWarper(0.9)(torch.zeros(2, 1, dtype=torch.long), x.clone()).softmax(-1)
    ours = Sampler.warped_probs(x, [p, p])
    assert int((ours[0] > 0).sum()) > 1024
    assert torch.equal(ours > 0, ref > 0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
