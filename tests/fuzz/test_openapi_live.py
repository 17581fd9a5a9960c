"""schemathesis against a live relay, from the relay's own ``/openapi.json``: generated requests for
every operation, valid and invalid ones, admin operations with the token. No request may get a 5xx,
and every status must be one the document lists.

The operations are driven one by one through ``APIOperation.as_strategy`` rather than schemathesis'
pytest plugin (``schemathesis.pytest.from_fixture``), which does not run under pytest 9 (it reads
``Node._nodeid``, gone from pytest 9)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.support.live_relay import LiveRelay, live_relay

ADMIN_TOKEN = "fuzz-admin"
ENV = {
    "RELAY_ADMIN_TOKEN": ADMIN_TOKEN, "ALLOWLIST_USERS": "u1,user", "MACHINE_BINDINGS": "u1:m1",
    "WECOM_TOKEN": "fuzz-token", "WECOM_ENCODING_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "WECOM_CORP_ID": "ww-fuzz", "RATE_LIMIT_PER_MINUTE": "100000", "RELAY_MAX_BODY_BYTES": "65536",
}
EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzzed_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRelay]:
    env = {**ENV, "AUDIT_LOG_PATH": str(tmp_path_factory.mktemp("fuzz") / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay:
        yield relay


@pytest.fixture(scope="module")
def api_schema(fuzzed_relay: LiveRelay) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzzed_relay.url("/openapi.json"))


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_request_gets_a_server_error(api_schema: schemathesis.BaseSchema, fuzzed_relay: LiveRelay,
                                        mode: schemathesis.GenerationMode) -> None:
    session = requests.Session()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 18
    exercised = 0
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=fuzzed_relay.base_url, session=session,
                                   headers={"x-admin-token": ADMIN_TOKEN},
                                   checks=[not_a_server_error, status_code_conformance])

        try:
            call()
        except Unsatisfiable:
            # Nothing of this operation can be made invalid (no parameters, no body): negative mode only.
            assert mode is schemathesis.GenerationMode.NEGATIVE
            continue
        exercised += 1
    assert exercised >= (len(operations) if mode is schemathesis.GenerationMode.POSITIVE else 12)


def test_the_document_lists_the_http_api(fuzzed_relay: LiveRelay) -> None:
    paths = requests.get(fuzzed_relay.url("/openapi.json"), timeout=5).json()["paths"]
    assert {"/healthz", "/wecom/callback", "/metrics", "/ops/config", "/machines", "/inflight", "/audit/recent",
            "/commands/{commandId}", "/commands/{commandId}/cancel", "/commands/{commandId}/retry", "/ops/store",
            "/ops/store/flags", "/metrics/prometheus"} <= set(paths)
    assert set(paths["/wecom/callback"]) == {"get", "post"}
