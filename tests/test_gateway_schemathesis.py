"""Schemathesis (every check) over the gateway's OpenAPI schema, against a real gateway backed by a real
fleet (one CPU worker, a small context so generated requests stay short): no 5xx, no failed check."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.generation import GenerationMode

from fleet_harness import module_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from module_fleet(tmp_path_factory, "schemathesis", num_workers=1, num_gpu_blocks=64,
                            max_model_len=MAX_MODEL_LEN, env={"PAGEDFLEET_MAX_MODEL_LEN": str(MAX_MODEL_LEN)})


@pytest.fixture(scope="module")
def api_schema(fleet):
    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": 8},
        # Valid by the schema is not always valid at run time: a prompt longer than the context, or a token id
        # outside the vocabulary, is a 400 that no schema can express (both depend on the workers' model);
        # an unknown job id is a 404. Everything else must be accepted.
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]}},
    })
    return schemathesis.openapi.from_url(fleet.url + "/openapi.json", config=config)


def test_gateway_openapi(api_schema):
    """Every operation, a few examples each (hypothesis drives schemathesis's strategies directly: its pytest
    plugin cannot take a schema from a module fixture under this pytest)."""
    load_all_checks()
    all_checks = CHECKS.get_all()  # --checks all
    failures, tried = {}, []
    for op_result in api_schema.get_all_operations():
        op = op_result.ok()
        tried.append(op.label)
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=all_checks, timeout=60)

        try:
            check()
        except Exception as e:  # every operation is tried; all failures are reported together
            failures[op.label] = e
    print(f"schemathesis: {len(tried)} operations, {len(all_checks)} checks, {len(failures)} failing")
    assert len(tried) >= 8, tried
    for label, e in failures.items():
        print(f"----- {label}\n{e}")
    assert not failures, sorted(failures)
