"""The scheduler side's settings: one pydantic-settings model, read from the environment (``PAGEDFLEET_*``)
and, in ``python -m scheduler.service``, from the command line (the same names in kebab case). Celery
housekeeping reads the same model (from the environment only)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from protocol import streams as S
from scheduler.scheduler import SchedulerConfig


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PAGEDFLEET_", extra="ignore", populate_by_name=True,
        cli_prog_name="python -m scheduler.service", cli_kebab_case=True, cli_implicit_flags=True,
        # the flags' earlier spellings keep working
        cli_shortcuts={"scheduler-host": "http-host", "scheduler-port": "http-port", "output-ttl-s": "output-ttl",
                       "job-ttl-s": "job-ttl"},
    )

    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           validation_alias=AliasChoices("redis_url", "PAGEDFLEET_REDIS_URL", "REDIS_URL"))
    scheduler_host: str = Field("0.0.0.0", description="the HTTP port's address")
    scheduler_port: int = Field(8001, description="HTTP: /metrics, /sd, /block-map, /v1/workers, /stats, /health")
    # the policy (one Scheduler per worker)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    prefix_caching: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    preemption_mode: Literal["auto", "swap", "recompute"] = "auto"
    max_model_len: int | None = None
    # pipelined scheduling (scheduler/lookahead.py): each worker's next plan is made while it runs the last
    pipeline: bool = Field(True, description="plan step N+1 while step N runs (--no-pipeline: one at a time)")
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
    log_level: str = "INFO"
    # Celery housekeeping
    reclaim_idle_s: float = Field(S.RECLAIM_IDLE_S,
                                  description="entries pending this long on one consumer are reclaimed")
    housekeeping_period_s: float = Field(15.0, description="seconds between reclaims (expiry and trims: twice that)")

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> SchedulerSettings:
        """Environment, then the command line (``argv``; None: sys.argv[1:])."""
        return CliApp.run(cls, cli_args=argv)

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
