"""ModelRunner driven by hand-built StepPlans (a minimal scheduler lives in `Driver`)."""

from __future__ import annotations

import collections

import pytest
import torch

from protocol import ForkSequence, NewSequence, SamplingParams, ScheduledSequence, StepPlan

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _encode(files, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files.path / "tokenizer.json"))
    return [tok.encode(t).ids for t in texts]


@pytest.fixture(scope="module")
def prompts(smollm2_files):
    return _encode(smollm2_files, [
        CHAT.format("What is the capital of France?"),
        "Once upon a time, in a small village by the sea,",
        CHAT.format("List three colours and explain why the sky is blue. " * 4),
    ])


class Driver:
    """Allocates whole block tables up front, schedules prefill chunks of `chunk` tokens (mixed with
    other sequences' decodes) and one-token decodes, and records the sampled tokens."""

    def __init__(self, runner, chunk: int = 16, first_block: int = 0):
        runner.seqs.clear()
        self.r = runner
        self.chunk = chunk
        self.next_block = first_block
        self.step_id = 0
        self.pending_new: list[NewSequence] = []
        self.state: dict[int, dict] = {}  # seq_id -> {"len": tokens known, "computed": n, "out": [...]}
        self.outputs: dict[int, list] = {}

    def blocks(self, n: int) -> list[int]:
        b = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return b

    def add(self, seq_id, ids, params, seed=0, seq_index=0, max_len=None):
        nb = -(-((max_len or len(ids) + params.max_tokens) + 1) // 16)
        self.pending_new.append(NewSequence(seq_id=seq_id, request_id=f"r{seq_id}", seq_index=seq_index,
                                            prompt_len=len(ids), token_ids=ids, block_table=self.blocks(nb),
                                            sampling=params, seed=seed))
        self.state[seq_id] = {"len": len(ids), "computed": 0, "out": [], "max": params.max_tokens}

    def step(self, **extra):
        sched = []
        for sid, st in self.state.items():
            if len(st["out"]) >= st["max"]:
                continue
            remaining = st["len"] - st["computed"]
            n = min(self.chunk, remaining)
            sched.append(ScheduledSequence(seq_id=sid, num_tokens=n, sample=n == remaining))
        plan = StepPlan(step_id=self.step_id, new_sequences=self.pending_new, scheduled=sched, **extra)
        self.pending_new = []
        self.step_id += 1
        res = self.r.execute(plan)
        for s in sched:
            self.state[s.seq_id]["computed"] += s.num_tokens
        for o in res.outputs:
            self.outputs.setdefault(o.seq_id, []).append(o)
            if o.token_id is not None:
                st = self.state.setdefault(o.seq_id, {"len": 0, "computed": 0, "out": [], "max": 0})
                st["out"].append(o.token_id)
                st["len"] += 1
        return res

    def run(self):
        while any(len(st["out"]) < st["max"] for st in self.state.values()):
            self.step()
        return {sid: st["out"] for sid, st in self.state.items()}

    def run_ahead(self):
        """Like ``run``, but each plan is launched before the previous step's result is taken (as the
        pipelined scheduler plans: every sampling sequence is assumed to get its token)."""
        in_flight = collections.deque()
        inflight_tokens: dict[int, int] = {}
        while True:
            sched = []
            for sid, st in self.state.items():
                if len(st["out"]) + inflight_tokens.get(sid, 0) >= st["max"]:
                    continue
                remaining = st["len"] + inflight_tokens.get(sid, 0) - st["computed"]
                n = min(self.chunk, remaining)
                sched.append(ScheduledSequence(seq_id=sid, num_tokens=n, sample=n == remaining))
            if sched:
                plan = StepPlan(step_id=self.step_id, new_sequences=self.pending_new, scheduled=sched)
                self.pending_new = []
                self.step_id += 1
                in_flight.append((self.r.launch(plan), sched))
                for e in sched:
                    self.state[e.seq_id]["computed"] += e.num_tokens
                    inflight_tokens[e.seq_id] = inflight_tokens.get(e.seq_id, 0) + e.sample
            if not in_flight:
                return {sid: st["out"] for sid, st in self.state.items()}
            if len(in_flight) > 1 or not sched:  # one plan ahead at most
                step, done = in_flight.popleft()
                for e in done:
                    inflight_tokens[e.seq_id] -= e.sample
                for o in step.result().outputs:
                    self.outputs.setdefault(o.seq_id, []).append(o)
                    st = self.state[o.seq_id]
                    st["out"].append(o.token_id)
                    st["len"] += 1


def _hf_generate(hf, ids, n, **kw):
    with torch.inference_mode():
        x = torch.tensor([ids])
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=2, **kw)
    return y[0, len(ids):].tolist()  # stops after EOS: compare that prefix


def test_greedy_chunked_prefill_and_decode_match_hf_generate(smollm2_runner, hf_smollm2, prompts):
    d = Driver(smollm2_runner, chunk=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, ids in enumerate(prompts):
        d.add(i, ids, greedy)
    got = d.run()
    for i, ids in enumerate(prompts):
        ref = _hf_generate(hf_smollm2, ids, 8)
        assert got[i][: len(ref)] == ref, i


def test_repetition_penalty_matches_hf(smollm2_runner, hf_smollm2, prompts):
    ids = prompts[1]
    d = Driver(smollm2_runner, chunk=64)
    d.add(0, ids, SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3, ignore_eos=True))
    ref = _hf_generate(hf_smollm2, ids, 10, repetition_penalty=1.3)
    assert d.run()[0][: len(ref)] == ref and len(ref) >= 5


def _sampled(runner, ids, params, seed, seq_index, chunk, companions=()):
    d = Driver(runner, chunk=chunk)
    d.add(0, ids, params, seed=seed, seq_index=seq_index)
    for j, other in enumerate(companions):
        d.add(10 + j, other, SamplingParams(temperature=1.0, max_tokens=params.max_tokens), seed=99 + j)
    return d.run()[0]


def test_seeded_sampling_independent_of_batching_and_chunking(smollm2_runner, prompts):
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=5, ignore_eos=True)
    alone = _sampled(smollm2_runner, prompts[0], p, seed=7, seq_index=0, chunk=64)
    batched = _sampled(smollm2_runner, prompts[0], p, seed=7, seq_index=0, chunk=9, companions=prompts[1:2])
    assert alone == batched
    other_seed = _sampled(smollm2_runner, prompts[0], p.model_copy(update={"temperature": 1.5}), seed=8,
                          seq_index=0, chunk=64)
    assert other_seed != alone


def test_fork_children_share_prefill_and_sample_their_own_tokens(smollm2_runner, prompts):
    r = smollm2_runner
    ids = prompts[1]  # 21 tokens: the last block is partial, so children need copy-on-write
    assert len(ids) % 16 != 0
    p = SamplingParams(temperature=1.0, max_tokens=4, n=3, ignore_eos=True)
    table = list(range(40, 40 + 2))
    new = NewSequence(seq_id=1, request_id="f", prompt_len=len(ids), token_ids=ids, block_table=table,
                      sampling=p, seed=123)
    kids = [ForkSequence(parent_seq_id=1, child_seq_id=c, seq_index=c - 1) for c in (2, 3)]
    res = r.execute(StepPlan(step_id=0, new_sequences=[new], scheduled=[
        ScheduledSequence(seq_id=1, num_tokens=len(ids), fork_children=kids)]))
    toks = {o.seq_id: [o.token_id] for o in res.outputs}
    assert set(toks) == {1, 2, 3}
    for c in (2, 3):  # children share the parent's table and computed count
        assert r.seqs[c].block_table == table and r.seqs[c].num_computed == len(ids)
        assert r.seqs[c].token_ids == ids + toks[c]
    # copy-on-write of the shared partial block, then decode all three
    last = len(ids) // 16
    cow = {2: 60, 3: 61}
    plan = StepPlan(step_id=1, block_copies=[(table[last], b) for b in cow.values()], scheduled=[
        ScheduledSequence(seq_id=1, num_tokens=1),
        *[ScheduledSequence(seq_id=c, num_tokens=1, block_updates=[(last, b), (last + 1, 70 + c)])
          for c, b in cow.items()]])
    plan.scheduled[0].block_updates.append((last + 1, 75))
    for step in range(1, 4):
        plan.step_id = step
        for o in r.execute(plan).outputs:
            toks[o.seq_id].append(o.token_id)
        plan = StepPlan(step_id=step + 1, scheduled=[ScheduledSequence(seq_id=s, num_tokens=1) for s in (1, 2, 3)])
    assert len({tuple(t) for t in toks.values()}) == 3, toks
    # each child equals the same request run on its own with its seq_index (counter-based randomness)
    r.seqs.clear()
    for c in (2, 3):
        assert _sampled(r, ids, p, seed=123, seq_index=c - 1, chunk=11) == toks[c]


def test_block_copy_and_swap_preserve_kv_and_generation(smollm2_runner, prompts):
    r = smollm2_runner
    ids = prompts[2]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = Driver(r, chunk=64, first_block=0)
    ref.add(0, ids, greedy)
    expected = ref.run()[0]
    r.seqs.clear()

    nb = -(-(len(ids) + 8) // 16)
    table = list(range(100, 100 + nb))
    res = r.execute(StepPlan(step_id=0, new_sequences=[NewSequence(
        seq_id=5, request_id="s", prompt_len=len(ids), token_ids=ids, block_table=table, sampling=greedy, seed=0)],
        scheduled=[ScheduledSequence(seq_id=5, num_tokens=len(ids))]))
    out = [res.outputs[0].token_id]
    # block copies: all layers, K and V
    before = r.kv_cache[:, :, table[:2]].clone()
    r.execute(StepPlan(step_id=1, block_copies=[(table[0], 200), (table[1], 201)]))
    assert torch.equal(r.kv_cache[:, :, [200, 201]], before)
    # swap out, clobber the GPU blocks, swap back in elsewhere and continue with the new table
    used = -(-len(ids) // 16)
    cpu = list(range(used))
    r.execute(StepPlan(step_id=2, swap_out=list(zip(table[:used], cpu))))
    assert torch.equal(r.cpu_cache[:, :, cpu], r.kv_cache[:, :, table[:used]])
    r.kv_cache[:, :, table] = 0
    new_table = list(range(150, 150 + nb))
    r.execute(StepPlan(step_id=3, swap_in=list(zip(cpu, new_table[:used]))))
    for step in range(4, 9):
        sched = ScheduledSequence(seq_id=5, num_tokens=1, reset_block_table=new_table if step == 4 else None)
        out.append(r.execute(StepPlan(step_id=step, scheduled=[sched])).outputs[0].token_id)
    assert out == expected


def test_prefix_cache_hit_computes_only_the_rest(smollm2_runner, prompts):
    r = smollm2_runner
    ids = prompts[2]
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    d = Driver(r, chunk=64)
    d.add(0, ids, greedy)
    expected = d.run()[0]
    hit = (len(ids) // 16) * 16
    assert hit >= 32
    table = r.seqs[0].block_table[: hit // 16] + [200, 201]  # the full prompt blocks are shared
    res = r.execute(StepPlan(step_id=50, new_sequences=[NewSequence(
        seq_id=1, request_id="p", prompt_len=len(ids), token_ids=ids, num_computed_tokens=hit,
        block_table=table, sampling=greedy, seed=0)], scheduled=[ScheduledSequence(seq_id=1, num_tokens=len(ids) - hit)]))
    out = [res.outputs[0].token_id]
    for step in (51, 52):
        out.append(r.execute(StepPlan(step_id=step, scheduled=[ScheduledSequence(seq_id=1, num_tokens=1)]))
                   .outputs[0].token_id)
    assert out == expected


def test_prompt_logprobs_chunked_equal_unchunked_and_hf(smollm2_runner, hf_smollm2, prompts):
    ids = prompts[0]
    p = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, logprobs=4, ignore_eos=True)
    runs = []
    for chunk in (1000, 7):
        smollm2_runner.seqs.clear()
        d = Driver(smollm2_runner, chunk=chunk)
        d.add(0, ids, p)
        d.run()
        plp = [e for o in d.outputs[0] if o.prompt_logprobs is not None for e in o.prompt_logprobs]
        sampled = [o for o in d.outputs[0] if o.token_id is not None]
        runs.append((plp, sampled))
    (a, sa), (b, sb) = runs
    assert len(a) == len(b) == len(ids) and a[0] is None and b[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        assert a[j][0].token_id == b[j][0].token_id == ids[j]
        assert abs(a[j][0].logprob - b[j][0].logprob) < 1e-4
        assert abs(a[j][0].logprob - float(ref[j - 1, ids[j]])) < 1e-3
        assert len(a[j]) in (3, 4) and [t.token_id for t in a[j]] == [t.token_id for t in b[j]]
    first = sa[0]
    assert len(first.top_logprobs) == 4 and first.top_logprobs[0].token_id == first.token_id  # greedy = top-1
    assert abs(first.logprob - float(ref[-1].max())) < 1e-3


def test_min_tokens_masks_eos(smollm2_runner, prompts):
    # greedy: "The capital of France is Paris." then EOS (2) at index 7 (checked against HF above)
    d = Driver(smollm2_runner, chunk=64)
    d.add(0, prompts[0], SamplingParams(temperature=0.0, max_tokens=9, min_tokens=9, stop_token_ids=[198]))
    out = d.run()[0]
    assert out[:7] == [504, 3575, 282, 4649, 314, 7042, 30]
    assert 2 not in out and 198 not in out


def test_beam_search_does_not_append_and_returns_2w_logprobs(smollm2_runner, prompts):
    r = smollm2_runner
    ids = prompts[1]
    p = SamplingParams(temperature=0.0, beam_width=2, n=2, max_tokens=4)
    res = r.execute(StepPlan(step_id=0, new_sequences=[NewSequence(
        seq_id=9, request_id="b", prompt_len=len(ids), token_ids=ids, block_table=[0, 1], sampling=p, seed=0)],
        scheduled=[ScheduledSequence(seq_id=9, num_tokens=len(ids))]))
    o = res.outputs[0]
    assert len(o.top_logprobs) == 4 and r.seqs[9].token_ids == ids
    # the scheduler picks a token (append_token_ids) and forks a second beam
    res = r.execute(StepPlan(step_id=1, forks=[ForkSequence(parent_seq_id=9, child_seq_id=10, seq_index=1)],
                             scheduled=[ScheduledSequence(seq_id=9, num_tokens=1, append_token_ids=[o.top_logprobs[0].token_id]),
                                        ScheduledSequence(seq_id=10, num_tokens=1, append_token_ids=[o.top_logprobs[1].token_id],
                                                          block_updates=[(1, 5)])],
                             block_copies=[(1, 5)]))
    assert [x.seq_id for x in res.outputs] == [9, 10]
    assert r.seqs[10].token_ids[-1] == o.top_logprobs[1].token_id and r.seqs[10].num_computed == len(ids) + 1


def test_errors_raise(smollm2_runner):
    with pytest.raises(ValueError, match="unknown"):
        smollm2_runner.execute(StepPlan(step_id=0, scheduled=[ScheduledSequence(seq_id=12345, num_tokens=1)]))
    with pytest.raises(ValueError, match="out of range"):
        smollm2_runner.execute(StepPlan(step_id=0, block_copies=[(0, 10**6)]))


def test_info_and_fp8_kv_cache(smollm2_files, prompts):
    from gpu_worker import ModelRunner, WorkerConfig

    r = ModelRunner(WorkerConfig(model=str(smollm2_files.path), num_gpu_blocks=16, num_cpu_blocks=0,
                                 kv_cache_dtype="fp8", max_model_len=1024), worker_id="w8")
    info = r.info
    assert (info.worker_id, info.num_gpu_blocks, info.max_model_len, info.vocab_size) == ("w8", 16, 1024, 49152)
    assert info.eos_token_ids == [2] and info.kv_cache_dtype == "fp8"
    assert info.kv_block_bytes == 30 * 2 * 16 * 3 * 64 * 1
    assert r.kv_cache.dtype == torch.float8_e4m3fn
    d = Driver(r, chunk=16)
    d.add(0, prompts[0], SamplingParams(temperature=0.0, max_tokens=8))
    out = d.run()[0]
    assert out[:4] == [504, 3575, 282, 4649]  # "The capital of France" survives an fp8 cache


def test_random_tiny_runs_with_auto_blocks():
    from gpu_worker import ModelRunner, WorkerConfig

    r = ModelRunner(WorkerConfig(model="random:tiny", seed=3))
    assert r.info.num_gpu_blocks == 256 * 2048 // 16 and r.info.vocab_size == 512
    d = Driver(r, chunk=8)
    d.add(0, list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=4))
    a = d.run()[0]
    r2 = ModelRunner(WorkerConfig(model="random:tiny", seed=3, num_gpu_blocks=8))
    d = Driver(r2, chunk=100)
    d.add(0, list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=4))
    assert d.run()[0] == a and len(a) == 4


def _tiny_runner(graphs: bool, backend: str = "torch"):
    """random:tiny on 64 blocks; ``graphs``: CUDA-graph staging with the graphs emulated by eager runs."""
    from gpu_worker import ModelRunner, WorkerConfig
    from gpu_worker.cuda_graphs import CudaGraphs

    r = ModelRunner(WorkerConfig(model="random:tiny", seed=5, num_gpu_blocks=64, num_cpu_blocks=0,
                                 max_model_len=256, cuda_graph_batch_sizes=(1, 2, 4, 8)))
    if backend == "triton":
        pytest.importorskip("triton")
        from gpu_worker.attention.triton_backend import TritonAttentionBackend

        r.backend = TritonAttentionBackend()
    if graphs:
        r.cuda_graphs = CudaGraphs(r, emulate=True)
    return r


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-staging"])
def test_launching_ahead_gives_the_synchronous_tokens(graphs):
    """Plans launched before the previous step's tokens reach the host (ModelRunner.launch): a decode whose
    input token is still on the device reads it there, in the eager forward and in the CUDA-graph staging
    (emulated); greedy prefill chunks, decodes and a sampled sequence mixed: the same tokens and logprobs
    as running one step at a time."""
    def run(ahead: bool):
        r = _tiny_runner(graphs)
        d = Driver(r, chunk=24)
        for i, (n, m) in enumerate([(3, 9), (40, 12), (17, 4), (70, 7), (5, 11)]):
            d.add(i, [(7 * i + 3 * j) % 500 + 1 for j in range(n)], SamplingParams(temperature=0.0, max_tokens=m))
        d.add(9, list(range(1, 30)), SamplingParams(temperature=0.8, seed=3, max_tokens=5, logprobs=2))
        forward = r._forward
        r._forward = lambda x: (gathered.append(x.pending_rows is not None), forward(x))[1]
        out = d.run_ahead() if ahead else d.run()
        return out, d.outputs, r

    gathered: list[bool] = []
    sync, sync_outs, _ = run(False)
    assert not any(gathered)
    ahead, ahead_outs, r = run(True)
    assert sum(gathered) >= 5  # steps whose inputs came from the device
    assert ahead == sync
    assert all(len(sync[i]) == m for i, m in enumerate([9, 12, 4, 7, 11]))
    for a, b in zip(sync_outs[9], ahead_outs[9]):
        assert abs(a.logprob - b.logprob) < 1e-5
    assert all(s.pending is None for s in r.seqs.values())  # every launched step was resolved
    if graphs:
        assert any(g.calls for g in r.cuda_graphs.graphs.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_graph_staging_matches_eager(backend):
    """The CUDA-graph input staging (static int32 slab, padded rows, partial block-table updates), with
    the graphs replaced by eager runs on the static buffers: same tokens and logprobs as the eager path,
    for batches that pad (5 -> 8, 3 -> 4) and sequences that finish at different steps."""
    def run(graphs: bool):
        r = _tiny_runner(graphs, backend)
        d = Driver(r, chunk=64)
        for i, (n, m) in enumerate([(3, 6), (40, 9), (17, 4), (70, 7), (5, 8)]):
            d.add(i, [(7 * i + 3 * j) % 500 + 1 for j in range(n)], SamplingParams(temperature=0.0, max_tokens=m))
        d.add(9, list(range(1, 30)), SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=2))
        out = d.run()
        if graphs:  # decode-only steps of 6 down to 1 sequences went through the staging (padded too)
            assert {pb for pb, g in r.cuda_graphs.graphs.items() if g.calls} >= {1, 4, 8}
        return out, d.outputs

    eager, eager_outs = run(False)
    graph, graph_outs = run(True)
    assert graph == eager
    for sid, outs in eager_outs.items():
        for a, b in zip(outs, graph_outs[sid]):
            if a.logprob is not None:
                assert abs(a.logprob - b.logprob) < 1e-4


def test_kernel_warm_up_leaves_generation_unchanged():
    """The start-up warm-up (gpu_worker/warmup.py) runs a decoder layer over mixed steps of many sizes and
    the LM head at every row count, writing keys and values into blocks no sequence owns yet. Sequences
    placed on those very blocks afterwards generate what they generate on a fresh cache: each reads only
    its own keys and values, and what the warm-up left in the rest of a block is finite (0 x NaN would
    poison a masked row)."""
    from gpu_worker.warmup import warm_up

    def run(warm: bool):
        r = _tiny_runner(False)
        if warm:
            warm_up(r)
            # blocks 16.. held the warm-up's prefill chunks: every slot written, values finite
            written = r.kv_cache[0, :, 16:28].abs().amax(dim=(0, 3, 4))
            assert (written > 0).all() and torch.isfinite(r.kv_cache).all()
        d = Driver(r, chunk=24, first_block=16)  # the sequences on exactly those blocks
        for i, (n, m) in enumerate([(3, 9), (40, 12), (17, 4), (70, 7)]):
            d.add(i, [(7 * i + 3 * j) % 500 + 1 for j in range(n)], SamplingParams(temperature=0.0, max_tokens=m))
        return d.run()

    assert run(True) == run(False)


def test_profile_step_takes_the_whole_token_budget():
    """The step that sizes the KV cache has max_num_batched_tokens tokens even past max_model_len: decodes
    first, then prefill chunks no longer than one sequence may be, on blocks of their own."""
    from gpu_worker.warmup import mixed_step

    meta, used = mixed_step(5000, 2048, 16, "cpu")
    q = meta.query_start_loc.diff().tolist()
    assert sum(q) == 5000 and q[:8] == [1] * 8 and max(q) == 2048 and len(q) == 8 + 3
    widths = [-(-int(n) // 16) for n in meta.seq_lens]
    blocks = [int(b) for row, w in zip(meta.block_tables, widths) for b in row[:w]]
    assert len(blocks) == len(set(blocks)) == used == sum(widths) and max(blocks) == used - 1
