"""What every service's settings share: one pydantic-settings base (environment ``PAGEDFLEET_<NAME>``, the
command line ``--<name>`` in kebab case, from the same declaration), the Redis URL (``REDIS_URL`` also
accepted), the log level and format, and ``from_cli``. Each service subclasses it: GatewaySettings
(gateway/settings.py), SchedulerSettings (scheduler/server/config.py), WorkerSettings
(gpu_worker/settings.py); docs/settings.md is their table (tests/test_settings_doc.py keeps it true)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from protocol.logs import LogFormat, setup_logging

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
INTERNAL_HOST = "127.0.0.1"  # internal ports (scheduler HTTP, worker metrics) bind here unless told otherwise

T = TypeVar("T", bound="ServiceSettings")


def service_config(prog: str, **kw: Any) -> SettingsConfigDict:
    """The model_config of a service's settings: ``prog`` names it in ``--help``; ``cli_shortcuts`` keeps
    earlier flag spellings working."""
    return SettingsConfigDict(env_prefix="PAGEDFLEET_", extra="ignore", populate_by_name=True,
                              cli_prog_name=prog, cli_kebab_case=True, cli_implicit_flags=True, **kw)


class ServiceSettings(BaseSettings):
    model_config = service_config("pagedfleet service")

    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis (a password in the URL is used: redis://:pw@host)",
                           validation_alias=AliasChoices("redis_url", "PAGEDFLEET_REDIS_URL", "REDIS_URL"))
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: LogFormat = Field("text", description="text, or json: one JSON object a line")

    @classmethod
    def from_cli(cls: type[T], argv: list[str] | None = None) -> T:
        """Environment, then the command line (``argv``; None: sys.argv[1:]). A bad value exits with a
        one-line message per setting (as argparse does), not a traceback."""
        try:
            return CliApp.run(cls, cli_args=argv)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise SystemExit(f"{cls.model_config.get('cli_prog_name')}: error: {problems}") from None

    def setup_logging(self) -> None:
        setup_logging(self.log_level, self.log_format)
