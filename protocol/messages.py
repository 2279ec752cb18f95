"""Scheduler <-> worker messages (StepPlan / StepResult) and the request-level messages around them.

Semantics the two halves agree on (docs/architecture.md shows where each side lives):

* The scheduler owns every block id. The worker keeps, per live sequence: its token ids, its block
  table (list of physical GPU block ids), its number of computed tokens, its sampling params and seed.
* A StepPlan is applied by the worker in this order:
    1. ``freed_seq_ids``: drop those sequences' state (finished, aborted, or preempted by recompute).
    2. ``swap_out`` (gpu block -> cpu block), then ``swap_in`` (cpu -> gpu), then ``block_copies``
       (gpu -> gpu, copy-on-write), each a list of (src, dst) pairs, all layers, one launch each.
    3. ``new_sequences``: register them (tokens, block table, num_computed_tokens = prefix-cache hit).
    4. ``forks``: clone the parent's state (tokens, block table, computed count, params) into the
       child, as it is *before* this step's compute (beam search uses this).
    5. for each ``scheduled`` entry, in order: apply ``reset_block_table`` (after swap-in), then
       ``block_updates`` (logical index -> physical block; an index equal to the table length appends),
       then ``append_token_ids`` (tokens the scheduler chose, beam search); then compute
       ``num_tokens`` tokens starting at the sequence's computed count, writing their K/V into the
       slots the block table gives, and advance the computed count.
    6. for entries with ``sample=True``: sample one token from the logits of the last computed
       token. Unless the sequence uses beam search, the worker appends that token to its own token
       ids (so the next decode step computes it). ``fork_children`` are cloned from the parent
       *after* the compute (they share its block table and computed count) and each samples its own
       token from the same logits row with its own ``seq_index``: this is how n > 1 shares one prefill.
* Randomness is counter based: the token at output position p of a sequence is drawn with a generator
  seeded from (seed, seq_index, p). A request's output therefore does not depend on batching,
  preemption or which worker runs it.
"""

from __future__ import annotations

from enum import Enum

from msgspec import field
from pydantic import BaseModel, ConfigDict, Field

from protocol.sampling import SamplingParams
from protocol.wire import Message

PROTOCOL_VERSION = 1


class _Msg(BaseModel):
    """The messages sent once per worker or request (validated when built)."""

    model_config = ConfigDict(extra="forbid")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the user or the client went away
    ERROR = "error"  # failed (e.g. dead-lettered); the message says why


class WorkerInfo(_Msg):
    """What a worker tells the scheduler when it registers."""

    version: int = PROTOCOL_VERSION
    worker_id: str
    model: str
    device: str = "cpu"
    block_size: int = 16
    num_gpu_blocks: int
    num_cpu_blocks: int = 0
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int] = Field(default_factory=list)
    kv_block_bytes: int = Field(0, description="bytes of one block across all layers, K and V")
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1


class GenerationRequest(_Msg):
    """A tokenised request, as the scheduler receives it."""

    version: int = PROTOCOL_VERSION
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    priority: int = Field(0, description="lower value runs first under the priority policy")
    arrival_time: float = 0.0



# ---- the hot path: built every step, validated on decode (protocol/wire.py) ----

class NewSequence(Message, kw_only=True):
    seq_id: int
    request_id: str
    seq_index: int = 0
    prompt_len: int
    token_ids: list[int]  # prompt plus tokens already generated (after recompute)
    num_computed_tokens: int = 0  # tokens whose K/V is already cached (prefix hit)
    block_table: list[int]
    sampling: SamplingParams
    seed: int


class ForkSequence(Message, kw_only=True, gc=False):
    parent_seq_id: int
    child_seq_id: int
    seq_index: int


class ScheduledSequence(Message, kw_only=True):
    seq_id: int
    num_tokens: int  # tokens to compute this step (a prefill chunk, or 1 to decode)
    reset_block_table: list[int] | None = None
    block_updates: list[tuple[int, int]] = field(default_factory=list)
    append_token_ids: list[int] = field(default_factory=list)
    sample: bool = True
    fork_children: list[ForkSequence] = field(default_factory=list)


class StepPlan(Message, kw_only=True):
    version: int = PROTOCOL_VERSION
    worker_id: str = ""
    step_id: int
    freed_seq_ids: list[int] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    forks: list[ForkSequence] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.freed_seq_ids or self.swap_out or self.swap_in or self.block_copies)


class TokenLogprob(Message, kw_only=True, gc=False):
    token_id: int
    logprob: float


class SequenceOutput(Message, kw_only=True):
    seq_id: int
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] | None = None
    # one entry per prompt token computed this step (the first prompt token has None)
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None


class StepResult(Message, kw_only=True):
    version: int = PROTOCOL_VERSION
    worker_id: str = ""
    step_id: int
    outputs: list[SequenceOutput] = field(default_factory=list)
    execute_ms: float = 0.0
    error: str | None = None


class SequenceOutputDelta(Message, kw_only=True):
    """New tokens of one completion (one sequence of a request) since the last delta."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class RequestOutputDelta(Message, kw_only=True):
    """What the scheduler publishes for a request after a step; the gateway/engine detokenises it."""

    version: int = PROTOCOL_VERSION
    request_id: str
    outputs: list[SequenceOutputDelta] = field(default_factory=list)
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    error: str | None = None
