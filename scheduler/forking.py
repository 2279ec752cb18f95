"""Groups of several sequences: n > 1 forks, parking for recompute, and beam search (no torch).

* n > 1: the request starts with one sequence; when its prompt completes, the children fork from it
  (they share every block, copy-on-write) and sample from the same logits row.
* parking: a group of several sequences preempted by recompute keeps its prompt sharing. Only
  ``live[0]`` (the root) is re-admitted and recomputes the prompt; the others are parked and forked from
  it again when its prompt is computed (``regroup``), then each appends and recomputes its own tokens.
* beam search: every live beam returns its top ``2 * width`` candidates; ``beam_step`` keeps the best
  ``width``, forking a beam chosen more than once and dropping the ones not chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import FinishReason, ForkSequence, SequenceOutputDelta
from scheduler.plan_builder import PlanBuilder
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED
_STOP = FinishReason.STOP
_LENGTH = FinishReason.LENGTH


def _fork(sched: Scheduler, g: SequenceGroup, parent: Sequence, seq_index: int) -> Sequence:
    """A new sequence of ``g`` sharing every block of ``parent`` (in the ledger; the worker is told apart)."""
    child = parent.fork(sched.new_seq_id(), seq_index)
    sched.kv.fork(parent, child)
    g.seqs.append(child)
    g.live.append(child)
    sched.seqs[child.seq_id] = child
    return child


def fork_at_prompt_end(sched: Scheduler, g: SequenceGroup, root: Sequence) -> list[Sequence]:
    """n > 1: the prompt completes in this step; the children share all its blocks (ledger fork now, the
    worker clones them after the compute) and sample from the same logits row."""
    g.needs_fork = False
    children = []
    for idx in range(1, g.sampling.n):
        child = _fork(sched, g, root, idx)
        child.registered = True
        children.append(child)
    return children


def emit_forks(sched: Scheduler, g: SequenceGroup, plan: PlanBuilder) -> None:
    """The forks made since the group's last step go out with its next plan entry."""
    for f in g.pending_forks:
        plan.forks.append(f)
        sched.seqs[f.child_seq_id].registered = True
    g.pending_forks = []


# ---------------------------------------------------------------------- parking (recompute)
def park(g: SequenceGroup) -> None:
    """Recompute keeps the prompt sharing: only the root is re-admitted, the others wait parked, so the
    group never needs more blocks than it had before (n independent prompts might never fit)."""
    if len(g.live) > 1 and all(len(s.token_ids) > g.prompt_len for s in g.live):
        root = g.live[0]
        root.compute_limit = g.prompt_len
        g.parked = g.live[1:] + g.parked
        g.live = [root]


def drop_parked(sched: Scheduler, g: SequenceGroup) -> list[int]:
    """Finish the parked sequences (the group ends); returns their indices."""
    idx = []
    for p in g.parked:
        p.status = _FINISHED
        sched.seqs.pop(p.seq_id, None)
        idx.append(p.seq_index)
    g.parked = []
    return idx


def regroup(sched: Scheduler, g: SequenceGroup) -> None:
    """The root of a recomputed forked group has its prompt again: fork the parked sequences from it.

    Each (root included) then appends its own generated tokens (append_token_ids) and computes them;
    the first write into the shared partial prompt block copies it, as after the original fork.
    """
    root = g.live[0]
    root.compute_limit = None
    plen = g.prompt_len
    root.pending_append = root.token_ids[plen:]
    for p in g.parked:
        p.num_computed_tokens = root.num_computed_tokens
        sched.kv.fork(root, p)
        p.num_cached_blocks = root.num_cached_blocks
        p.status = _RUNNING
        p.pending_append = p.token_ids[plen:]
        p.beam_candidates = None
        sched.seqs[p.seq_id] = p
        g.pending_forks.append(ForkSequence(parent_seq_id=root.seq_id, child_seq_id=p.seq_id,
                                            seq_index=p.seq_index))
        g.live.append(p)
    g.parked = []


# ---------------------------------------------------------------------- beam search
def beam_score(g: SequenceGroup, tokens: list[int], cum_logprob: float) -> float:
    """vLLM's length-penalised beam score: cum_logprob / len ** length_penalty, where len counts the
    prompt and excludes a final EOS/stop token."""
    n = len(tokens)
    if tokens and tokens[-1] in g.stop_ids:
        n -= 1
    return cum_logprob / (max(n, 1) ** g.sampling.length_penalty)


def add_hypothesis(g: SequenceGroup, tokens: list[int], cum_logprob: float, reason: FinishReason) -> None:
    g.beam_completed.append((beam_score(g, tokens, cum_logprob), tokens, cum_logprob, reason))


def beam_outputs(g: SequenceGroup) -> list[SequenceOutputDelta]:
    """The best ``n`` finished hypotheses by score: the request's only output."""
    best = sorted(g.beam_completed, key=lambda h: -h[0])[: g.sampling.n]
    return [SequenceOutputDelta(index=i, token_ids=toks[g.prompt_len:], finish_reason=reason)
            for i, (_, toks, _, reason) in enumerate(best)]


def _choose_beams(g: SequenceGroup, width: int, n_out: int) -> list[tuple[float, Sequence, int]]:
    """Rank every candidate of every live beam by cumulative logprob; an EOS/stop one among the top
    ``width`` becomes a finished hypothesis. Returns the (score, parent, token) picks that continue."""
    cands = []
    for s in g.live:
        base = s.cumulative_logprob
        for tl in s.beam_candidates:
            cands.append((base + tl.logprob, s.seq_id, s, tl.token_id))
        s.beam_candidates = None
    cands.sort(key=lambda c: (-c[0], c[1], c[3]))
    stop_ok = n_out + 1 >= g.min_tokens
    chosen: list[tuple[float, Sequence, int]] = []
    seen: set[tuple[int, int]] = set()
    for rank, (score, _, s, tok) in enumerate(cands):
        if (s.seq_id, tok) in seen:
            continue
        seen.add((s.seq_id, tok))
        if tok in g.stop_ids:
            if stop_ok and rank < width:
                add_hypothesis(g, s.token_ids + [tok], score, _STOP)
            continue
        chosen.append((score, s, tok))
        if len(chosen) == width:
            break
    g.beam_completed.sort(key=lambda h: -h[0])
    del g.beam_completed[width:]
    return chosen


def _continue_beams(sched: Scheduler, g: SequenceGroup, chosen: list[tuple[float, Sequence, int]]) -> None:
    """Reuse each chosen parent once; extra picks of the same parent fork it (before it appends); the
    beams not chosen are dropped."""
    used: set[int] = set()
    assign: list[tuple[Sequence, int, float]] = []
    before = list(g.live)
    for score, s, tok in chosen:
        if s.seq_id not in used:
            used.add(s.seq_id)
            assign.append((s, tok, score))
            continue
        child = _fork(sched, g, s, g.next_seq_index)
        g.next_seq_index += 1
        child.status = _RUNNING
        g.pending_forks.append(ForkSequence(parent_seq_id=s.seq_id, child_seq_id=child.seq_id,
                                            seq_index=child.seq_index))
        assign.append((child, tok, score))
    for s in before:
        if s.seq_id not in used:
            g.live.remove(s)
            sched.release_seq(s)  # dropped beam
    for s, tok, score in assign:
        s.token_ids.append(tok)
        s.cumulative_logprob = score
        s.pending_append = [tok]


def beam_step(sched: Scheduler, g: SequenceGroup, touched: list[SequenceGroup]) -> None:
    """All live beams have their candidates: keep the best ``beam_width``.

    The search ends when ``beam_width`` hypotheses are finished (early stopping), or the beams reach
    max_tokens / max_model_len; the best ``n`` by length-penalised score are returned (``touched``
    gets the group then).
    """
    live = g.live
    if any(s.beam_candidates is None for s in live):
        return  # some beams are still recomputing
    width = g.sampling.beam_width
    n_out = live[0].num_output_tokens
    length_done = n_out + 1 >= g.max_tokens or live[0].num_tokens + 1 >= sched.max_model_len
    chosen = _choose_beams(g, width, n_out)
    if length_done or not chosen or len(g.beam_completed) >= width:
        if length_done:
            for score, s, tok in chosen:
                add_hypothesis(g, s.token_ids + [tok], score, _LENGTH)
        for s in list(live):
            sched.release_seq(s)
        live.clear()
        sched.finish_group(g)
        g.delta_buf = beam_outputs(g)
        touched.append(g)
        return
    _continue_beams(sched, g, chosen)
