"""LLMEngine: the scheduler half and the worker half of PagedFleet in one process.

The two halves exchange exactly the StepPlan / StepResult messages the fleet sends over Redis
Streams; here they are passed as objects. Around them the engine tokenises prompts, detokenises
output deltas and applies stop strings (which need text, so the scheduler cannot).
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from protocol import GenerationRequest, RequestOutputDelta, SamplingParams
from protocol.heap import freeze_heap
from model_io.output_processor import RequestOutputProcessor
from pagedfleet.outputs import RequestOutput


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    num_cpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    quantization: str | None = None  # "fp8": FP8 decoder weights (gpu_worker/layers/linear.py)
    attention_backend: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: default_max_num_batched_tokens(device)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: str = "fcfs"
    preemption_mode: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks of the worker group (gpu_worker/tp_group.py): 1 + N-1 spawned processes
    # protocol/heap.py freeze_heap() once the engine is built: full collections stop walking torch, the model
    # and the libraries (~100 ms each on a busy CPU, every few dozen steps)
    freeze_gc: bool = True
    # pipelined scheduling (scheduler/lookahead.py): plan step N+1 while the GPU runs step N, launched without
    # waiting for its tokens (ModelRunner.launch); ``lookahead`` plans ahead at most (1: two plans in flight).
    # False: plan, run, apply, in turn.
    pipeline: bool = False  # off by default until a pool-capacity finish matches the synchronous form (test_pipelining)
    lookahead: int = 1
    extra_worker: dict[str, Any] = field(default_factory=dict)


# EngineConfig fields passed on as they are to WorkerConfig and to SchedulerConfig. max_num_seqs goes to both
# (the worker's largest CUDA-graph decode batch); max_num_batched_tokens only to the scheduler.
_WORKER_OPTIONS = (
    "device", "dtype", "block_size", "num_gpu_blocks", "num_cpu_blocks", "gpu_memory_utilization",
    "kv_cache_dtype", "quantization", "attention_backend", "max_model_len", "seed", "max_num_seqs",
    "max_num_batched_tokens",  # the worker profiles a step of this size before sizing the KV cache
    "tensor_parallel_size",
)
_SCHEDULER_OPTIONS = (
    "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching", "policy",
    "preemption_mode", "max_model_len",
)


def default_max_num_batched_tokens(device: str) -> int:
    """vLLM's budget for its offline LLM class: 16384 tokens a step on a GPU of 70 GiB or more other than an
    A100 (where a larger budget lost throughput: vLLM PR #17885), 8192 on other GPUs; 2048 on the CPU, whose
    steps are slow enough that a bigger one only delays the decodes sharing it."""
    if not device.startswith("cuda"):
        return 2048
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return 16384 if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower() else 8192


@dataclass
class _RequestState:
    output: RequestOutput
    processor: RequestOutputProcessor


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides: Any):
        from gpu_worker import WorkerConfig
        from gpu_worker.tp_group import start_runner
        from scheduler import Scheduler, SchedulerConfig
        from model_io.model_files import resolve_model
        from model_io.tokenizer import Tokenizer

        config = config or EngineConfig()
        for k, v in overrides.items():
            if not hasattr(config, k):
                raise TypeError(f"unknown engine option {k!r}")
            setattr(config, k, v)
        if config.lookahead < 0:
            raise ValueError("lookahead: must be >= 0")
        if config.max_num_batched_tokens is None:
            config.max_num_batched_tokens = default_max_num_batched_tokens(config.device)
        self.config = config
        files = resolve_model(config.model)
        self.model_name = files.name
        self.tokenizer = Tokenizer(files.path) if files.path is not None else None
        worker_kwargs = {name: getattr(config, name) for name in _WORKER_OPTIONS}
        worker_kwargs["model"] = config.model or files.name
        worker_kwargs.update(config.extra_worker)
        self.runner = start_runner(WorkerConfig(**worker_kwargs), worker_id="local")
        self.worker_info = self.runner.info
        try:
            self.scheduler = Scheduler(
                SchedulerConfig(**{name: getattr(config, name) for name in _SCHEDULER_OPTIONS}), self.worker_info
            )
        except BaseException:
            self.close()  # a tensor-parallel group's other ranks go too
            raise
        self.max_model_len = self.worker_info.max_model_len
        self._requests: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self._max_in_flight = 1 + (config.lookahead if config.pipeline else 0)
        self._in_flight: collections.deque = collections.deque()  # the plans launched (their result()), oldest first
        if config.freeze_gc:
            freeze_heap()

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = prompt
            text = None
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            text = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            raise ValueError("prompt: must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: must not be empty")
        return text, ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | dict | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Validate and enqueue one request. Raises ValueError (or pydantic's ValidationError,
        which names the field) before touching any state, so nothing in flight is disturbed."""
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams(**params)
        text, ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens do not fit the model's context of {self.max_model_len} tokens"
            )
        if ids and max(ids) >= self.worker_info.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt: token ids must be in [0, {self.worker_info.vocab_size})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        now = time.time()
        self.scheduler.add_request(
            GenerationRequest(
                request_id=request_id, prompt_token_ids=ids, sampling=params, priority=priority, arrival_time=now
            )
        )
        processor = RequestOutputProcessor(self.tokenizer, request_id, ids, params)
        out = RequestOutput(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            outputs=processor.completions,  # the processor fills them in place
            arrival_time=now,
        )
        self._requests[request_id] = _RequestState(out, processor)
        return request_id

    def abort_request(self, request_id: str) -> None:
        if request_id in self._requests:
            self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._in_flight) or self.scheduler.has_unfinished_requests()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute, apply. Returns the requests that changed.

        Pipelined: keep up to ``1 + lookahead`` plans launched (the next ones planned and launched while the
        oldest runs on the GPU), then apply the oldest result."""
        if not self.config.pipeline:
            deltas = self.scheduler.update(self.runner.execute(self.scheduler.schedule()))
        else:
            self._fill_pipeline()
            deltas = self.scheduler.update(self._in_flight.popleft().result())
        changed = []
        for delta in deltas:
            state = self._requests.get(delta.request_id)
            if state is None:
                continue
            self._apply_delta(state, delta)
            changed.append(state.output)
            if state.output.finished:
                del self._requests[delta.request_id]
        return changed

    def _fill_pipeline(self) -> None:
        sched = self.scheduler
        while len(self._in_flight) < self._max_in_flight:
            if sched.num_in_flight == 0:
                if self._in_flight:
                    break  # an empty plan is queued: nothing to plan ahead of
                plan = sched.schedule()
            else:
                plan = sched.schedule_ahead()
                if plan is None:
                    break  # this step needs the results first: synchronous
            self._in_flight.append(self.runner.launch(plan))

    def _apply_delta(self, state: _RequestState, delta: RequestOutputDelta) -> None:
        out, processor = state.output, state.processor
        now = time.time()
        updates = processor.apply(delta)
        if out.first_token_time is None and any(u.token_ids for u in updates):
            out.first_token_time = now
        out.prompt_logprobs = processor.prompt_logprobs
        out.num_cached_tokens = processor.num_cached_tokens
        if processor.error:
            out.error = processor.error
        if processor.done:
            if processor.needs_abort:
                # Every completion ended on a stop string: free the blocks now.
                processor.abort_sent = True
                self.scheduler.abort_request(out.request_id)
            out.finished = True
            out.finished_time = now

    def close(self) -> None:
        """Stop a tensor-parallel group's other ranks (a no-op for one rank; also done at exit)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def run_to_completion(self) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return list(done.values())
