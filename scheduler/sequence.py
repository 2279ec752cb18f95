"""Sequences and sequence groups as the scheduler tracks them (no torch).

A ``SequenceGroup`` is one request; its ``Sequence``s are its completions (``n > 1`` parallel samples,
or the live beams of beam search). A sequence's ``token_ids`` are prompt + generated tokens; its
``num_computed_tokens`` counts the tokens whose K/V is in the cache (the worker's computed count).
``token_ids[num_computed_tokens:]`` are the tokens still to compute: the rest of the prompt while
prefilling, then exactly one (the last sampled token) while decoding.
"""

from __future__ import annotations

import enum
import hashlib
from array import array

from protocol.messages import FinishReason, ForkSequence, GenerationRequest, SequenceOutputDelta, TokenLogprob
from protocol.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted by recompute
    RUNNING = "running"  # holds GPU blocks
    SWAPPED = "swapped"  # preempted by swap: holds CPU blocks
    FINISHED = "finished"

    @property
    def is_finished(self) -> bool:
        return self is SequenceStatus.FINISHED


def hash_block_tokens(parent_hash: bytes | None, token_ids) -> bytes:
    """Chained, process-independent hash of one full block: H(parent hash, its token ids)."""
    h = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        h.update(parent_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class Sequence:
    __slots__ = (
        "seq_id",
        "request_id",
        "seq_index",
        "token_ids",
        "prompt_len",
        "num_computed_tokens",
        "status",
        "group",
        "block_hashes",
        "num_cached_blocks",
        "registered",
        "pending_append",
        "cumulative_logprob",
        "beam_candidates",
        "compute_limit",
        "num_inflight",
        "inflight_samples",
    )

    def __init__(self, seq_id: int, request_id: str, token_ids: list[int], prompt_len: int, seq_index: int = 0,
                 group: "SequenceGroup | None" = None) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.seq_index = seq_index
        self.token_ids = token_ids
        self.prompt_len = prompt_len
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.group = group
        self.block_hashes: list[bytes] = []  # hashes of this sequence's full blocks (prefix of token_ids)
        self.num_cached_blocks = 0  # leading blocks of the table already offered to the prefix cache
        self.registered = False  # does the worker know this sequence?
        self.pending_append: list[int] = []  # beam search: chosen tokens not yet sent to the worker
        self.cumulative_logprob = 0.0
        self.beam_candidates: list[TokenLogprob] | None = None  # beam search: this step's top candidates
        # recompute of a forked group: the root computes only its prompt before the others fork from it
        self.compute_limit: int | None = None
        # pipelined scheduling: tokens computed by plans sent and not yet applied, and how many of those
        # plans sample it (tokens the worker has and the scheduler does not know yet)
        self.num_inflight = 0
        self.inflight_samples = 0

    # ------------------------------------------------------------------ lengths
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens to compute before the next sample (or before the group re-forks, see compute_limit)."""
        end = self.compute_limit if self.compute_limit is not None else len(self.token_ids)
        return end - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ------------------------------------------------------------------ block hashes
    def full_block_hashes(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Hashes of the first ``num_blocks`` full blocks (computed lazily, kept)."""
        hs = self.block_hashes
        toks = self.token_ids
        while len(hs) < num_blocks:
            i = len(hs)
            hs.append(hash_block_tokens(hs[-1] if hs else None, toks[i * block_size:(i + 1) * block_size]))
        return hs

    def take_pending_append(self) -> list[int]:
        """The chosen tokens the worker does not have yet (cleared: they go out in this step's entry)."""
        pa = self.pending_append
        if not pa:
            return []
        self.pending_append = []
        return pa

    def fork(self, new_seq_id: int, seq_index: int) -> "Sequence":
        child = Sequence(new_seq_id, self.request_id, list(self.token_ids), self.prompt_len, seq_index, self.group)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.block_hashes = list(self.block_hashes)
        child.num_cached_blocks = self.num_cached_blocks
        child.cumulative_logprob = self.cumulative_logprob
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id}, idx={self.seq_index}, len={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")


class SequenceGroup:
    """One request: its sequences, sampling params, queue key and seed, plus the finish-check constants
    the hot path reads (derived once from the sampling params at ``add_request``)."""

    __slots__ = (
        "request_id", "sampling", "prompt_len", "seed", "key", "seqs", "live", "parked", "status",
        "num_cached_tokens", "first_admitted", "pending_forks", "beam_completed", "prompt_logprobs_buf",
        "prompt_logprobs_done", "prompt_logprobs_ready", "next_seq_index", "scheduled_step", "delta_buf",
        "stop_ids", "stop_token_ids", "max_tokens", "min_tokens", "want_logprobs", "want_top",
        "want_prompt_logprobs", "needs_fork", "beam", "slow_path", "single",
    )

    def __init__(self, request: GenerationRequest, seed: int, arrival_seq: int, policy: str = "fcfs",
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        sp: SamplingParams = request.sampling
        self.request_id = request.request_id
        self.sampling = sp
        self.prompt_len = len(request.prompt_token_ids)
        self.seed = seed
        # queue order: lower first. Priority policy: (priority, arrival); FCFS: arrival only.
        if policy == "priority":
            self.key = (request.priority, request.arrival_time, arrival_seq)
        else:
            self.key = (0, request.arrival_time, arrival_seq)
        self.seqs: list[Sequence] = []  # every sequence ever created, by creation
        self.live: list[Sequence] = []  # unfinished sequences that have (or will get at admission) a block table
        self.parked: list[Sequence] = []  # recompute of a forked group: forked again from live[0] after its prompt
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0  # prefix-cache hit of the first admission
        self.first_admitted = False
        self.pending_forks: list[ForkSequence] = []  # beam search forks not yet sent to the worker
        self.beam_completed: list[tuple[float, list[int], float, FinishReason]] = []  # (score, tokens, cum lp, reason)
        self.prompt_logprobs_buf: list = []
        self.prompt_logprobs_done = False
        self.prompt_logprobs_ready = False  # the prompt's last chunk sampled: its logprobs go out with the token
        self.next_seq_index = 1
        self.scheduled_step = -1  # last step this group was scheduled in
        self.delta_buf: list[SequenceOutputDelta] = []  # this step's deltas of a group with several of them
        # finish-check constants, kept on the group for the hot path
        stop = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop |= eos_token_ids
        self.stop_ids = frozenset(stop)
        self.stop_token_ids = frozenset(sp.stop_token_ids)
        self.max_tokens = sp.max_tokens
        self.min_tokens = sp.min_tokens
        self.want_logprobs = sp.logprobs is not None
        self.want_top = bool(sp.logprobs)
        self.want_prompt_logprobs = sp.prompt_logprobs is not None
        self.needs_fork = sp.n > 1 and sp.beam_width == 0  # n > 1: fork the children when the prompt completes
        self.beam = sp.beam_width > 0
        # hot-path flags: one completion without prompt logprobs or beams -> one delta straight away
        self.slow_path = self.beam or self.want_prompt_logprobs
        self.single = sp.n == 1 and not self.slow_path

    @property
    def use_beam_search(self) -> bool:
        return self.sampling.beam_width > 0

    @property
    def max_num_seqs(self) -> int:
        """Sequences this group will have at most (what admission reserves against max_num_seqs)."""
        if self.sampling.beam_width > 0:
            return self.sampling.beam_width
        return self.sampling.n

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __lt__(self, other: "SequenceGroup") -> bool:  # heapq
        return self.key < other.key

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id}, {self.status.value}, live={len(self.live)})"
