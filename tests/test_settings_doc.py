"""One settings model per service, one name per setting, one table: docs/settings.md is what the models say,
and the names in it are the ones the services read (environment and flags, earlier flag spellings too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from pagedfleet.settings_doc import settings_doc
from scheduler.server.config import SchedulerSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_docs_table_is_generated_from_the_models():
    assert DOC.read_text() == settings_doc(), "run: python -m pagedfleet.settings_doc > docs/settings.md"


@pytest.mark.parametrize("model", [GatewaySettings, SchedulerSettings, WorkerSettings])
def test_redis_url_log_format_and_shared_ttls_read_the_same_names(model, monkeypatch):
    for var in ("PAGEDFLEET_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://:secret@10.0.0.9:6380/2")
    monkeypatch.setenv("PAGEDFLEET_LOG_FORMAT", "json")
    monkeypatch.setenv("PAGEDFLEET_JOB_TTL_S", "123")  # once PAGEDFLEET_JOB_TTL here, _S there
    s = model.from_cli([])
    assert s.redis_url == "redis://:secret@10.0.0.9:6380/2" and s.log_format == "json"
    if "job_ttl_s" in model.model_fields:
        assert s.job_ttl_s == 123
    assert model.from_cli(["--log-format", "text"]).log_format == "text"  # a flag wins over the environment


def test_worker_flags_keep_their_earlier_spellings(monkeypatch):
    monkeypatch.setenv("PAGEDFLEET_HEARTBEAT_TTL_S", "1.5")
    monkeypatch.setenv("PAGEDFLEET_QUANTIZATION", "")  # the ConfigMap's "none"
    s = WorkerSettings.from_cli(["--worker-id", "w0", "--device", "cpu", "--num-gpu-blocks", "512", "--threads", "1",
                                 "--max-model-len", "2048", "--metrics-port", "0", "--advertise-host", "auto",
                                 "--heartbeat-interval", "0.25", "--metrics-host", "0.0.0.0"])
    assert (s.worker_id, s.num_gpu_blocks, s.threads, s.heartbeat_interval_s, s.heartbeat_ttl_s) == \
        ("w0", 512, 1, 0.25, 1.5)
    assert s.quantization is None and s.worker_metrics_host == "0.0.0.0" and s.advertise_host == "auto"
    assert WorkerSettings().worker_metrics_host == "127.0.0.1" and SchedulerSettings().scheduler_host == "127.0.0.1"
    assert WorkerSettings.from_cli(["--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    with pytest.raises(SystemExit):  # no ranks: refused, not ignored
        WorkerSettings.from_cli(["--tensor-parallel-size", "0"])


def test_gateway_api_keys_from_flag_or_environment(monkeypatch):
    assert GatewaySettings.from_cli(["--api-key", "k1", "--api-key", "k2"]).api_keys == ["k1", "k2"]
    monkeypatch.setenv("PAGEDFLEET_API_KEYS", "a, b")
    assert GatewaySettings().api_keys == ["a", "b"]
    monkeypatch.delenv("PAGEDFLEET_API_KEYS")
    monkeypatch.setenv("PAGEDFLEET_API_KEY", "only")
    assert GatewaySettings().api_keys == ["only"]
