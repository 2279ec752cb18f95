"""`pagedfleet bench serve` against a real CPU fleet (redis-server, scheduler, one worker, gateway): the
JSON it prints and writes has every figure, and the figures agree with what was asked."""

from __future__ import annotations

import json

import pytest

from fleet_harness import module_fleet
from pagedfleet.cli import main as cli_main

pytestmark = [pytest.mark.fleet, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "bench", num_workers=1, num_gpu_blocks=256, max_model_len=1024)


@pytest.mark.parametrize("rate", ["inf", "20"])
def test_bench_serve_reports_consistent_figures(fleet, tmp_path, capsys, rate):
    out = tmp_path / "serve.json"
    rc = cli_main(["bench", "serve", "--base-url", fleet.url, "--num-prompts", "6", "--request-rate", rate,
                   "--input-len", "24", "--output-len", "8", "--range-ratio", "0.5", "--vocab-size", "49152",
                   "--result-file", str(out)])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert rc == 0 and printed == written
    r = written
    assert r["completed"] == r["num_prompts"] == 6 and r["failed"] == 0, r["errors"]
    assert r["output_tokens_per_request"] == r["requested_output_tokens"]  # ignore_eos: exactly max_tokens
    assert r["total_output_tokens"] == sum(r["requested_output_tokens"])
    assert r["total_input_tokens"] >= 6 * 12
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
    assert r["request_throughput"] == pytest.approx(6 / r["duration_s"])
    for m in ("ttft", "tpot", "itl", "e2el"):
        mean, median, p99 = r[f"mean_{m}_ms"], r[f"median_{m}_ms"], r[f"p99_{m}_ms"]
        assert 0 < median <= p99 and 0 < mean <= p99 * 1.0001, (m, mean, median, p99)
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"] <= r["duration_s"] * 1e3


def test_bench_serve_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "serve", "--num-prompts", "0"])
    assert e.value.code == 2 and "--num-prompts" in capsys.readouterr().err
