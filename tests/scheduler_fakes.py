"""Test helpers for the scheduler tests: a fake worker that applies StepPlans exactly as the protocol
(protocol/messages.py) says, with a simulated KV cache, and a driver loop.

The fake KV cache stores, in each slot, a digest of the token prefix ending at that position (what real
K/V depends on). Before computing, the worker checks that every already-computed position of the sequence
reads the right digest through its block table: a wrong prefix-cache hit, a missed copy-on-write, a bad
swap mapping or a stale block table all show up as a mismatch. When given the scheduler, it also checks
that no slot is written in a block whose ledger ref count is > 1, and that its block tables equal the
ledger's after every plan.
"""

from __future__ import annotations

import hashlib
import random

from protocol.messages import SequenceOutput, StepPlan, StepResult, TokenLogprob, WorkerInfo


def _digest(prev: int, tok: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{prev}:{tok}".encode(), digest_size=8).digest(), "little")


class _WSeq:
    __slots__ = ("seq_id", "seq_index", "tokens", "prompt_len", "table", "computed", "sampling", "seed", "digests")

    def clone(self, seq_id: int, seq_index: int) -> "_WSeq":
        c = _WSeq()
        c.seq_id, c.seq_index = seq_id, seq_index
        c.tokens, c.prompt_len, c.table = list(self.tokens), self.prompt_len, list(self.table)
        c.computed, c.sampling, c.seed, c.digests = self.computed, self.sampling, self.seed, list(self.digests)
        return c

    def digest(self, p: int) -> int:
        d = self.digests
        while len(d) <= p:
            i = len(d)
            d.append(_digest(d[-1] if d else 0, self.tokens[i]))
        return d[p]


class FakeWorker:
    def __init__(self, info: WorkerInfo, scheduler=None, eos_prob: float = 0.0, check_kv: bool = True) -> None:
        self.info = info
        self.bs = info.block_size
        self.gpu = [[None] * self.bs for _ in range(info.num_gpu_blocks)]
        self.cpu = [[None] * self.bs for _ in range(info.num_cpu_blocks)]
        self.seqs: dict[int, _WSeq] = {}
        self.sched = scheduler
        self.eos_prob = eos_prob
        self.check_kv = check_kv
        self.steps = 0
        self.plans: list[StepPlan] = []
        self.keep_plans = False

    # ------------------------------------------------------------------ sampling
    def sample_token(self, s: _WSeq) -> int:
        p = len(s.tokens) - s.prompt_len  # output position
        rng = random.Random(f"{s.seed}:{s.seq_index}:{p}")
        sp = s.sampling
        eos = self.info.eos_token_ids
        banned = set()
        if p < sp.min_tokens:
            banned = set(eos) | set(sp.stop_token_ids)
        if eos and self.eos_prob and rng.random() < self.eos_prob and p >= sp.min_tokens:
            return eos[0]
        while True:
            t = rng.randrange(self.info.vocab_size)
            if t not in banned and t not in eos:
                return t

    def beam_candidates(self, s: _WSeq) -> list[TokenLogprob]:
        """2 * width distinct tokens with logprobs that depend only on the token prefix."""
        k = 2 * s.sampling.beam_width
        rng = random.Random(s.digest(len(s.tokens) - 1))
        toks = rng.sample(range(self.info.vocab_size), k)
        eos = self.info.eos_token_ids
        if eos and self.eos_prob and rng.random() < self.eos_prob * 4 and eos[0] not in toks:
            toks[rng.randrange(k)] = eos[0]
        lps = sorted((-rng.expovariate(1.0) for _ in range(k)), reverse=True)
        return [TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(toks, lps)]

    # ------------------------------------------------------------------ checks
    def _check_prefix(self, s: _WSeq) -> None:
        if not self.check_kv:
            return
        bs = self.bs
        for p in range(s.computed):
            b = s.table[p // bs]
            assert self.gpu[b][p % bs] == s.digest(p), (
                f"seq {s.seq_id}: KV at position {p} (block {b}) is not this sequence's")

    def _ledger_ref(self, block: int) -> int | None:
        if self.sched is None:
            return None
        return self.sched.kv.gpu.blocks[block].ref_cnt

    # ------------------------------------------------------------------ execute
    def execute(self, plan: StepPlan) -> StepResult:
        StepPlan.model_validate_json(plan.model_dump_json())  # the plan survives the wire
        if self.keep_plans:
            self.plans.append(plan)
        self.steps += 1
        bs = self.bs
        # 1. frees
        for sid in plan.freed_seq_ids:
            assert sid in self.seqs, f"free of unknown sequence {sid}"
            del self.seqs[sid]
        # 2. swap out, swap in, copies
        for g, c in plan.swap_out:
            self.cpu[c] = list(self.gpu[g])
        for c, g in plan.swap_in:
            self.gpu[g] = list(self.cpu[c])
        dsts = [d for _, d in plan.block_copies]
        assert len(set(dsts)) == len(dsts), "two copies into one block"
        for src, dst in plan.block_copies:
            self.gpu[dst] = list(self.gpu[src])
        # 3. new sequences
        for ns in plan.new_sequences:
            assert ns.seq_id not in self.seqs, f"sequence {ns.seq_id} registered twice"
            s = _WSeq()
            s.seq_id, s.seq_index, s.tokens, s.prompt_len = ns.seq_id, ns.seq_index, list(ns.token_ids), ns.prompt_len
            s.table, s.computed, s.sampling, s.seed, s.digests = list(ns.block_table), ns.num_computed_tokens, \
                ns.sampling, ns.seed, []
            assert s.computed < len(s.tokens)
            self._check_prefix(s)  # prefix-cache hit: the cached blocks hold exactly this prefix
            self.seqs[s.seq_id] = s
        # 4. forks (state before this step's compute)
        for f in plan.forks:
            assert f.child_seq_id not in self.seqs
            self.seqs[f.child_seq_id] = self.seqs[f.parent_seq_id].clone(f.child_seq_id, f.seq_index)
        # 5/6. compute + sample
        outputs: list[SequenceOutput] = []
        for e in plan.scheduled:
            s = self.seqs[e.seq_id]
            if e.reset_block_table is not None:
                s.table = list(e.reset_block_table)
            for idx, b in e.block_updates:
                assert 0 <= idx <= len(s.table), f"seq {s.seq_id}: block update at {idx} beyond table {len(s.table)}"
                if idx == len(s.table):
                    s.table.append(b)
                else:
                    s.table[idx] = b
            s.tokens.extend(e.append_token_ids)
            self._check_prefix(s)
            assert e.num_tokens >= 1
            assert s.computed + e.num_tokens <= len(s.tokens), (s.seq_id, s.computed, e.num_tokens, len(s.tokens))
            prompt_lps = []
            for p in range(s.computed, s.computed + e.num_tokens):
                assert p // bs < len(s.table), f"seq {s.seq_id}: no block for position {p}"
                b = s.table[p // bs]
                ref = self._ledger_ref(b)
                if ref is not None:  # fork_children are cloned after this compute: not holders yet
                    ref -= len(e.fork_children)
                assert ref is None or ref == 1, f"seq {s.seq_id} writes position {p} into block {b} with ref {ref}"
                self.gpu[b][p % bs] = s.digest(p)
                if p < s.prompt_len:
                    prompt_lps.append(None if p == 0 else [TokenLogprob(token_id=s.tokens[p], logprob=-1.0)])
            s.computed += e.num_tokens
            want_plp = s.sampling.prompt_logprobs is not None and prompt_lps
            if not e.sample:
                if want_plp:
                    outputs.append(SequenceOutput(seq_id=s.seq_id, prompt_logprobs=prompt_lps))
                continue
            assert s.computed == len(s.tokens), "sampling from a token that is not the last"
            children = [s.clone(f.child_seq_id, f.seq_index) for f in e.fork_children]
            for i, w in enumerate([s] + children):
                if w is not s:
                    assert w.seq_id not in self.seqs
                    self.seqs[w.seq_id] = w
                if w.sampling.beam_width > 0:
                    cands = self.beam_candidates(w)
                    outputs.append(SequenceOutput(seq_id=w.seq_id, token_id=cands[0].token_id,
                                                  logprob=cands[0].logprob, top_logprobs=cands,
                                                  prompt_logprobs=prompt_lps if (want_plp and i == 0) else None))
                    continue
                t = self.sample_token(w)
                lp = -float(t % 7) / 7.0
                tops = None
                if w.sampling.logprobs:
                    tops = [TokenLogprob(token_id=t, logprob=lp)] + [
                        TokenLogprob(token_id=(t + j) % self.info.vocab_size, logprob=lp - j)
                        for j in range(1, w.sampling.logprobs)]
                outputs.append(SequenceOutput(seq_id=w.seq_id, token_id=t, logprob=lp, top_logprobs=tops,
                                              prompt_logprobs=prompt_lps if (want_plp and i == 0) else None))
                w.tokens.append(t)
        self._check_ledger_tables()
        return StepResult(worker_id=plan.worker_id, step_id=plan.step_id, outputs=outputs)

    def _check_ledger_tables(self) -> None:
        sch = self.sched
        if sch is None:
            return
        registered = {sid for sid, s in sch.seqs.items() if s.registered}
        assert set(self.seqs) == registered, (
            f"worker sequences {sorted(set(self.seqs) ^ registered)} differ from the scheduler's")
        for sid, w in self.seqs.items():
            t = sch.kv.get_table(sid)
            if t is not None and t.device == "gpu":
                assert w.table == t.block_ids(), f"seq {sid}: worker table {w.table} != ledger {t.block_ids()}"
                s = sch.seqs[sid]
                n = min(len(w.tokens), len(s.token_ids))
                assert w.tokens[:n] == s.token_ids[:n], f"seq {sid}: worker and scheduler tokens differ"



def drive(sched, worker: FakeWorker, max_steps: int = 20000, check: bool = True, on_step=None):
    """Run until every request finished. Returns (tokens, finish reasons, deltas per request)."""
    tokens: dict[str, dict[int, list[int]]] = {}
    reasons: dict[str, dict[int, object]] = {}
    finals: dict[str, object] = {}
    steps = 0
    while sched.has_unfinished_requests():
        steps += 1
        assert steps <= max_steps, "the scheduler made no progress"
        plan = sched.schedule()
        if check:
            sched.check_invariants()
        result = worker.execute(plan)
        deltas = sched.update(result)
        if check:
            sched.check_invariants()
        for d in deltas:
            assert d.request_id not in finals, f"delta after the final one for {d.request_id}"
            for o in d.outputs:
                tokens.setdefault(d.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
                if o.finish_reason is not None:
                    reasons.setdefault(d.request_id, {})[o.index] = o.finish_reason
            if d.finished:
                finals[d.request_id] = d
        if on_step is not None:
            on_step(plan, deltas)
    return tokens, reasons, finals
