"""Tensor-parallel worker groups on the CPU (gloo on 127.0.0.1): the same greedy tokens as one rank.

Rank 0 runs in this process, the other ranks are spawned (gpu_worker/tp_group.py). Every step crosses the
group's collectives ~60 times, so the workloads are small; float32 throughout (sharding changes only the
order of a few sums)."""

from __future__ import annotations

import pytest
import torch

from protocol import SamplingParams
from protocol import streams as S

MAX_NEW = 6


def _llm(model, tp, extra_worker=None, **options):
    from pagedfleet.llm import LLM

    return LLM(model, dtype="float32", tensor_parallel_size=tp, extra_worker=dict(num_threads=1, **(extra_worker or {})),
               **options)


def _generate(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


def _mixed_run(tp):
    """Shared 40-token prefix (prefix cache), chunks of 24 tokens (chunked prefill next to decodes), n = 2 on
    one request (a fork), 8 KV blocks for ~200 tokens of context (preemption): swapped first, recomputed
    next. Returns the tokens of both passes and the scheduler's stats."""
    torch.set_num_threads(1)
    prefix = [1] + [(7 * i) % 400 + 30 for i in range(39)]
    prompts = [prefix + [(13 * i + j) % 300 + 500 for j in range(k)] for i, k in enumerate((3, 9, 17, 24))]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    params = [greedy, SamplingParams(n=2, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), greedy, greedy]
    llm = _llm(None, tp, num_gpu_blocks=8, num_cpu_blocks=64, max_num_batched_tokens=24, max_num_seqs=8,
               max_model_len=256, preemption_mode="swap")
    try:
        swapped = _generate(llm, prompts, params)
        llm.engine.scheduler.config.preemption_mode = "recompute"
        recomputed = _generate(llm, prompts, params)
        return swapped, recomputed, llm.engine.scheduler.stats(), llm.engine.worker_info
    finally:
        llm.engine.close()


@pytest.fixture(scope="module")
def one_rank():
    return _mixed_run(1)


def test_tp3_smollm2_equals_one_rank_through_chunks_prefix_cache_fork_and_preemption(one_rank):
    swapped, recomputed, stats, info = _mixed_run(3)
    assert info.tensor_parallel_size == 3
    assert (swapped, recomputed) == one_rank[:2]
    assert all(len(c) == MAX_NEW for out in swapped + recomputed for c in out)
    assert stats["preemptions_swap"] > 0 and stats["preemptions_recompute"] > 0, stats
    assert stats["prefix_cache_hit_tokens"] > 0, stats
    assert stats["gpu_blocks_used"] == 0 and stats["cpu_blocks_used"] == 0, stats
    assert one_rank[2]["preemptions_swap"] == stats["preemptions_swap"]


def _tiny_tokens(tp, check=None, **options):
    """``check(llm)``, when given, runs on the started engine before it generates."""
    torch.set_num_threads(1)
    prompts = [[1] + [(11 * j) % 500 + 3 for j in range(k)] for k in (5, 30, 12)]
    llm = _llm("random:tiny", tp, num_gpu_blocks=32, max_num_batched_tokens=16, max_num_seqs=8, **options)
    try:
        if check is not None:
            check(llm)
        return _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    finally:
        llm.engine.close()


def test_tp2_random_llama_equals_one_rank():
    assert _tiny_tokens(2) == _tiny_tokens(1)


def test_tp2_kernel_warm_up_runs_on_every_rank_and_changes_no_token():
    """The start-up warm-up (gpu_worker/warmup.py, forced on here: by default it runs on CUDA only) crosses
    the group's collectives in its layer and LM-head passes: every rank runs it in the same order, the group
    starts, and it generates what a group without it does."""
    def warmed(llm):
        assert llm.engine.runner.kernel_warm_up_s is not None  # rank 0's; the others ran theirs alongside

    assert _tiny_tokens(2, warmed, extra_worker=dict(warm_up_kernels=True)) == _tiny_tokens(1)


def _tiny_prompt_logprobs(tp, **options):
    """The logprob of every prompt token after the first (prefill chunks of 16) on the random model."""
    torch.set_num_threads(1)
    prompts = [[1] + [(11 * j) % 500 + 3 for j in range(k)] for k in (5, 30, 12)]
    llm = _llm("random:tiny", tp, num_gpu_blocks=32, max_num_batched_tokens=16, max_num_seqs=8, **options)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    finally:
        llm.engine.close()
    return torch.tensor([next(e.logprob for e in entry if e.token_id == tok)
                         for p, o in zip(prompts, outs) for tok, entry in zip(p[1:], o.prompt_logprobs[1:])])


def test_tp2_fp8_weights_and_fp8_kv_cache_run_sharded():
    """FP8 weights and an FP8 KV cache, sharded. A row-parallel shard quantizes its activations per token
    over its own columns (and its weight rows over its own columns), as vLLM does, so the numbers are not
    those of one FP8 rank, only as close to them as FP8 is to float32; a wrong shard is ~10x further off."""
    fp8 = dict(quantization="fp8", kv_cache_dtype="fp8")
    exact, one, two = _tiny_prompt_logprobs(1), _tiny_prompt_logprobs(1, **fp8), _tiny_prompt_logprobs(2, **fp8)
    fp8_error = (one - exact).abs().max().item()
    assert 0 < fp8_error < 0.05
    assert (two - one).abs().max().item() < 2 * fp8_error
    assert (two - exact).abs().max().item() < 2 * fp8_error
    # and the logprobs do tell tokens apart (a broken model would not be caught by a flat distribution)
    assert (exact.max() - exact.min()).item() > 10 * fp8_error


def test_a_dead_rank_takes_the_group_down_with_a_clear_error():
    """SIGKILL rank 1 of an offline group: the next step raises, naming the rank (no hang)."""
    import os
    import signal

    torch.set_num_threads(1)
    llm = _llm("random:tiny", 2, num_gpu_blocks=32, max_num_seqs=8)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        assert len(llm.generate([[1, 5, 7]], params)[0].outputs[0].token_ids) == 2
        rank1 = llm.engine.runner.procs[0]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        with pytest.raises(RuntimeError, match=r"tensor-parallel group is down: rank 1 .* exited with code -9"):
            llm.generate([[1, 5, 8]], params)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("model,tp,numbers", [
    (None, 2, ("tensor_parallel_size 2", "num_attention_heads (9)", "num_key_value_heads (3)")),
    ("random:tiny", 3, ("tensor_parallel_size 3", "num_attention_heads (4)", "num_key_value_heads (2)")),
])
def test_heads_that_do_not_divide_are_refused_at_start(model, tp, numbers):
    import multiprocessing

    before = multiprocessing.active_children()
    with pytest.raises(ValueError) as e:
        _llm(model, tp)
    for words in numbers:
        assert words in str(e.value)
    assert multiprocessing.active_children() == before  # refused before any rank was spawned


def test_cli_generate_with_tensor_parallel_size(capsys):
    from pagedfleet.cli import main

    assert main(["generate", "--model", "random:tiny", "--prompt", "x", "--max-tokens", "3", "--json",
                 "--tensor-parallel-size", "3"]) == 2
    assert "num_attention_heads (4)" in capsys.readouterr().err


def test_worker_service_refuses_heads_that_do_not_divide(tmp_path):
    import subprocess
    import sys

    from fleet_harness import REPO, RedisServer

    redis = RedisServer(tmp_path / "redis")
    try:
        p = subprocess.run([sys.executable, "-m", "gpu_worker.service", "--redis-url", redis.url, "--worker-id", "w",
                            "--tensor-parallel-size", "2", "--num-gpu-blocks", "8"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "num_attention_heads (9)" in p.stderr and "tensor_parallel_size 2" in p.stderr
        assert redis.client().hlen(S.WORKERS) == 0  # never registered
    finally:
        redis.stop()
