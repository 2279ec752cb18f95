"""Gateway settings: environment variables PAGEDFLEET_* and the same names as flags of `python -m gateway.app`
(one declaration; protocol/service_settings.py)."""

from __future__ import annotations

from pathlib import Path
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
    processes: int = Field(1, ge=1, le=64, description="gateway processes sharing the port (uvicorn workers, "
                           "restarted if one dies), for more clients than one event loop keeps up with; with more "
                           "than one, /metrics adds up every process's (prometheus-client's multiprocess mode)")
    keep_alive_s: float = Field(30.0, gt=0, description="an idle keep-alive connection is closed after this long "
                                "(uvicorn's 5 s default lets a busy client reuse a connection as it closes)")
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

    # ---- API keys and rate limits (gateway/auth.py, gateway/rate_limit.py) -----------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("api_keys", "PAGEDFLEET_API_KEYS", "PAGEDFLEET_API_KEY"),
        description="keys a client must send as `Authorization: Bearer KEY` (comma-separated in the environment; "
                    "none: the API is open); env PAGEDFLEET_API_KEY or PAGEDFLEET_API_KEYS")
    api_key_file: str | None = Field(None, description="a file of more API keys, one per line ('#' comments)")
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute per key (a token bucket "
                                                               "holding a minute's worth: that is the burst)")
    rate_limit_tpm: int | None = Field(None, ge=1, description="tokens per minute per key: prompt tokens + "
                                                               "max_tokens x n, charged when a request is accepted")
    # ---- files and the Batch API (gateway/file_store.py, gateway/batch/) ------------------------
    files_dir: str | None = Field(None, description="keep uploaded and batch output files in this directory "
                                                    "(None: in Redis)")
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="an upload over this is a 413")
    max_batch_lines: int = Field(50_000, ge=1, description="a batch input file with more lines fails validation")
    batch_max_in_flight: int = Field(8, ge=1, description="requests of one batch running at once")
    batch_priority: int = Field(10, description="priority of batch requests (lower runs first under the "
                                                "scheduler's priority policy; interactive requests default to 0)")
    batch_lease_s: float = Field(10.0, gt=0, description="a batch whose runner stopped renewing its lease for "
                                                         "this long is resumed by another batch worker")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            return [k.strip() for item in v for k in str(item).split(",") if k.strip()]
        return v

    def all_api_keys(self) -> list[str]:
        """The configured keys: `api_keys` and the lines of `api_key_file`."""
        keys = list(self.api_keys)
        if self.api_key_file:
            for line in Path(self.api_key_file).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        return keys
