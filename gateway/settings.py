"""Gateway settings: environment variables PAGEDFLEET_* (or arguments of `python -m gateway`)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAGEDFLEET_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("redis_url", "REDIS_URL", "PAGEDFLEET_REDIS_URL"))
    model: str | None = Field(None, description="model spec the fleet serves (None: SmolLM2-135M-Instruct)")
    model_dir: str | None = Field(None, description="resolved model directory (tokenizer); skips resolve_model")
    served_model_name: str | None = Field(None, description="name clients pass as `model` (default: the model's name)")
    host: str = "0.0.0.0"
    port: int = 8000
    job_ttl_s: int = Field(24 * 3600, description="finished jobs and their results are kept this long")
    output_ttl_s: int = Field(600, description="a finished request's output stream is kept this long")
    request_timeout_s: float = Field(600.0, description="a request with no output for this long fails")
    worker_cache_s: float = Field(1.0, description="how long the list of live workers is cached")
    max_model_len: int | None = Field(None, description="context length when no worker has registered yet")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024,
                                description="a request body over this many bytes is a 413 (counted as it "
                                            "arrives, never read whole first); env PAGEDFLEET_MAX_BODY_BYTES")
    scheduler_url: str = Field("http://127.0.0.1:8001",
                               description="the scheduler service's HTTP address (the block-map proxy reads its "
                                           "/block-map); env PAGEDFLEET_SCHEDULER_URL")
