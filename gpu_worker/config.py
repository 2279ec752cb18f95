"""WorkerConfig: what one model runner is asked to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerConfig:
    model: str | None = None  # a resolve_model spec; None: smollm2-135m-instruct
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA) | "float32" | "bfloat16" | "float16"
    block_size: int = 16
    num_gpu_blocks: int | None = None  # None: sized from memory (see below)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the device for weights + activations + KV cache
    cpu_kv_cache_gib: float = 2.0  # device "cpu", num_gpu_blocks None: KV cache budget
    num_cpu_blocks: int | None = None  # swap space in blocks; None: from swap_space_gib
    swap_space_gib: float | None = None  # None: 4 GiB on CUDA, 0.5 GiB on CPU
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) | "fp8" (float8_e4m3fn, per-layer scales)
    kv_scale: float = 1.0  # FP8: the K and V scale of every layer (stored = value / scale)
    quantization: str | None = None  # None | "fp8": decoder linear weights in float8_e4m3fn (layers/linear.py)
    attention_backend: str = "auto"  # "auto" (triton on CUDA if importable, else torch) | "torch" | "triton"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048  # CUDA profiling forward size
    seed: int = 0  # random weights
    num_threads: int | None = None  # CPU: torch.set_num_threads (None: leave torch's default)
    # CUDA graphs for decode-only steps (CUDA + Triton backend only; ignored elsewhere): the model forward is
    # captured once per padded batch size after the KV cache is allocated and replayed for decode steps
    enable_cuda_graphs: bool = True
    max_num_seqs: int = 256  # largest decode batch captured (the scheduler's max_num_seqs)
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, 8, then every 16 up to max_num_seqs
    # launch every kernel shape of the step loop once at start (gpu_worker/warmup.py), so that no lazy module
    # load or Triton compile stalls the GPU between steps later; None: on CUDA only (True: on the CPU too)
    warm_up_kernels: bool | None = None
    # ranks of one tensor-parallel group (gpu_worker/tp_group.py starts them; gpu_worker/distributed.py):
    # each holds 1/N of the heads of every layer and of every KV block
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} (auto, fp8)")
        if self.quantization not in (None, "none", "fp8"):
            raise ValueError(f"quantization: {self.quantization!r} (none, fp8)")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend: {self.attention_backend!r} (auto, torch, triton)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: {self.dtype!r} (auto, float32, bfloat16, float16)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization: must be in (0, 1]")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError("num_gpu_blocks: must be positive")
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 0:
            raise ValueError("num_cpu_blocks: must be >= 0")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs: must be positive")
        if self.cuda_graph_batch_sizes is not None and any(int(b) <= 0 for b in self.cuda_graph_batch_sizes):
            raise ValueError("cuda_graph_batch_sizes: must be positive")
