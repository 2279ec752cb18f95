"""The worker service's settings (``python -m gpu_worker.service``): environment ``PAGEDFLEET_*`` and the
same names as flags; earlier flag spellings (``--metrics-port``, ``--heartbeat-interval``, ...) still work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from protocol.service_settings import INTERNAL_HOST, ServiceSettings, service_config


class WorkerSettings(ServiceSettings):
    model_config = service_config(
        "python -m gpu_worker.service",
        cli_shortcuts={"worker-metrics-port": "metrics-port", "worker-metrics-host": "metrics-host",
                       "heartbeat-interval-s": "heartbeat-interval", "heartbeat-ttl-s": "heartbeat-ttl",
                       "drain-timeout-s": "drain-timeout"},
    )

    worker_id: str | None = Field(None, description="this worker's id (default: hostname-pid)")
    model: str | None = Field(None, description="model spec (default: the embedded SmolLM2-135M-Instruct)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: the GPU CUDA_VISIBLE_DEVICES names first")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="model dtype (auto: float32 on the CPU, bfloat16 on CUDA)")
    block_size: int = Field(16, description="tokens per KV-cache block (a power of two)")
    num_gpu_blocks: int | None = Field(None, description="KV-cache blocks (default: sized from memory)")
    num_cpu_blocks: int | None = Field(None, description="swap space in blocks")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="CUDA: fraction of the device used")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] | None = Field(
        None, description="auto: the model dtype; fp8: float8_e4m3fn blocks with per-layer scales")
    quantization: Literal["none", "fp8"] | None = Field(
        None, description="fp8: decoder weights in float8_e4m3fn, activations quantized per token")
    attention_backend: Literal["auto", "torch", "triton"] | None = Field(
        None, description="auto: triton on CUDA when importable, else torch")
    max_model_len: int | None = Field(None, description="context length (default: the model's)")
    max_num_seqs: int | None = Field(None, description="largest decode batch (CUDA graphs are captured up to it)")
    max_num_batched_tokens: int | None = Field(None, description="CUDA: the profiling forward's size")
    seed: int | None = Field(None, description="seed of random weights (random:<shape> models)")
    tensor_parallel_size: int = Field(1, ge=1, description="ranks of this worker's tensor-parallel group, one "
                                                         "process (GPU) each; one worker to the scheduler")
    threads: int | None = Field(None, description="torch CPU threads")
    worker_metrics_port: int = Field(0, description="Prometheus port (0: a free one)")
    worker_metrics_host: str = Field(INTERNAL_HOST, description="address the Prometheus port binds "
                                                                "(0.0.0.0 where Prometheus scrapes from outside)")
    advertise_host: str = Field("127.0.0.1", description="host Prometheus scrapes this worker's /metrics at; "
                                                         "auto: the local address of the route to Redis")
    heartbeat_interval_s: float = Field(0.5, gt=0, description="seconds between heartbeats")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="a worker silent this long is declared dead")
    drain_timeout_s: float = Field(
        240.0, ge=0, description="on SIGTERM: seconds to finish running requests; those left are handed back")

    @field_validator("quantization", "dtype", "kv_cache_dtype", "attention_backend", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v == "" else v  # PAGEDFLEET_QUANTIZATION="" (the ConfigMap's "none set")
