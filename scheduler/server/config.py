"""The scheduler side's settings: one pydantic-settings model (protocol/service_settings.py), read from the
environment (``PAGEDFLEET_*``) and, in ``python -m scheduler.service``, from the command line (the same names
in kebab case). Celery housekeeping reads the same model (from the environment only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol import streams as S
from protocol.service_settings import INTERNAL_HOST, ServiceSettings, service_config
from scheduler.scheduler import SchedulerConfig


class SchedulerSettings(ServiceSettings):
    model_config = service_config(
        "python -m scheduler.service",
        # the flags' earlier spellings keep working
        cli_shortcuts={"scheduler-host": "http-host", "scheduler-port": "http-port", "output-ttl-s": "output-ttl",
                       "job-ttl-s": "job-ttl"},
    )

    scheduler_host: str = Field(INTERNAL_HOST, description="the HTTP port's address (0.0.0.0 on an internal "
                                                           "network: compose, Kubernetes)")
    scheduler_port: int = Field(8001, description="HTTP: /metrics, /sd, /block-map, /v1/workers, /stats, /health")
    # the policy (one Scheduler per worker)
    max_num_seqs: int = Field(256, description="most requests one worker runs at once")
    max_num_batched_tokens: int = Field(2048, description="tokens one step computes at most (a prefill is chunked)")
    chunked_prefill: bool = Field(True, description="split long prompts over steps, decodes alongside")
    prefix_caching: bool = Field(True, description="share the KV blocks of common prompt prefixes")
    policy: Literal["fcfs", "priority"] = Field("fcfs", description="which waiting request goes first")
    preemption_mode: Literal["auto", "swap", "recompute"] = Field(
        "auto", description="out of KV blocks: swap to CPU blocks or recompute later (auto: swap when it fits)")
    max_model_len: int | None = Field(None, description="context limit (default: each worker's)")
    # pipelined scheduling (scheduler/lookahead.py): each worker's next plan is made while it runs the last
    pipeline: bool = Field(True, description="plan step N+1 while step N runs (--no-pipeline: one step at a time; a "
                                                 "group that outgrows the whole KV pool may stop one token apart)")
    pipeline_lookahead: int = Field(1, ge=1, description="plans made ahead per worker when pipelined")
    # the fleet
    monitor_interval: float = Field(0.25, description="seconds between liveness checks")
    max_resumes: int = Field(3, description="a request that loses more workers fails")
    max_queue_imbalance: int = Field(
        4, description="a prefix-cache hit wins placement only if that worker's queue is at most this much longer")
    max_deliveries: int = Field(
        S.MAX_DELIVERIES,
        description="a request entry delivered more often (the scheduler kept dying on it) is dead-lettered")
    output_ttl_s: float = Field(S.OUTPUT_TTL_S, description="a finished request's output stream is kept this long")
    job_ttl_s: float = Field(S.JOB_TTL_S, description="a finished job's output stream is kept this long")
    lease_ttl: float = Field(5.0, description="seconds the scheduler lease lasts unless refreshed")
    rejoin_grace: float = Field(5.0,
                                description="after a restart, seconds to wait for the known workers before placing")
    track_preemption: bool = Field(True, description="job status 'preempted' while a job's request is preempted")
    stats_log_interval_s: float = Field(10.0, description="seconds between throughput lines while busy (0: none)")
    # the autoscaling gauge pagedfleet_desired_workers (scheduler/server/autoscale.py)
    target_queue_per_worker: float = Field(
        4.0, gt=0, description="waiting requests one worker may have before another is wanted")
    target_kv_utilization: float = Field(
        0.8, gt=0, le=1, description="KV-cache use a worker should run at: above it, another worker is wanted")
    # Celery housekeeping
    reclaim_idle_s: float = Field(S.RECLAIM_IDLE_S,
                                  description="entries pending this long on one consumer are reclaimed")
    housekeeping_period_s: float = Field(15.0, description="seconds between reclaims (expiry and trims: twice that)")

    @property
    def max_plans_in_flight(self) -> int:
        """Plans a worker may have in flight at once."""
        return 1 + self.pipeline_lookahead if self.pipeline else 1

    def scheduler_config(self) -> SchedulerConfig:
        """The policy's configuration for every worker's Scheduler."""
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=self.chunked_prefill, enable_prefix_caching=self.prefix_caching,
            policy=self.policy, preemption_mode=self.preemption_mode, max_model_len=self.max_model_len,
        )
