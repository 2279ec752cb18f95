"""Gateway settings: environment variables PAGEDFLEET_* and the same names as flags of `python -m gateway.app`
(one declaration; protocol/service_settings.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import NoDecode

from protocol import streams as S
from protocol.service_settings import ServiceSettings, service_config


class GatewaySettings(ServiceSettings):
    model_config = service_config("python -m gateway.app", cli_shortcuts={"api-keys": "api-key"})

    model: str | None = Field(None, description="model spec the fleet serves (None: SmolLM2-135M-Instruct)")
    model_dir: str | None = Field(None, description="resolved model directory (tokenizer); skips resolve_model")
    served_model_name: str | None = Field(None, description="name clients pass as `model` (default: the model's name)")
    host: str = Field("0.0.0.0", description="the public API's address")
    port: int = Field(8000, description="the public API's port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("api_keys", "PAGEDFLEET_API_KEYS", "PAGEDFLEET_API_KEY"),
        description="keys a request must carry (Authorization: Bearer KEY); comma-separated; empty: no check")
    job_ttl_s: int = Field(S.JOB_TTL_S, description="finished jobs and their results are kept this long")
    output_ttl_s: int = Field(S.OUTPUT_TTL_S, description="a finished request's output stream is kept this long")
    request_timeout_s: float = Field(600.0, description="a request with no output for this long fails")
    worker_cache_s: float = Field(1.0, description="how long the list of live workers is cached")
    max_model_len: int | None = Field(None, description="context length when no worker has registered yet")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024,
                                description="a request body over this many bytes is a 413 (counted as it "
                                            "arrives, never read whole first)")
    scheduler_url: str = Field("http://127.0.0.1:8001",
                               description="the scheduler service's HTTP address (the block-map proxy reads its "
                                           "/block-map)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            return [k.strip() for item in v for k in str(item).split(",") if k.strip()]
        return v
