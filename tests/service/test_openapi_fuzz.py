"""schemathesis against our own OpenAPI spec, with auth on: no 5xx, and every answer matches its declared
schema (every error body included). Each generated case is sent with the tenant's key and, to check the
401 path as well, again with a wrong key and with none. Over 1000 generated cases in total
(`test_enough_cases_ran` checks the count, so the run cannot silently shrink)."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.jobs.config import Settings
from service.keys import create_key
from tests.service.conftest import REDIS_URL, beat, cleanup

PREFIX = "bora-fuzz-" + secrets.token_hex(4)
DATA_DIR = Path(tempfile.mkdtemp(prefix="bora-fuzz-"))
KEY = create_key(DATA_DIR / "api-keys.json", "fuzz")
# Admission limits high enough that generated submissions reach the job-creation path (they have their own tests).
APP = create_app(Settings(redis_url=REDIS_URL, key_prefix=PREFIX, data_dir=DATA_DIR, rate_limit_burst=100_000,
                          max_queued_per_tenant=0, max_queued_total=0))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# Every answer: a documented status, the documented body shape and media type, and the documented headers
# (Retry-After on 429/503, WWW-Authenticate on 401).
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance,
          response_headers_conformance]
MIN_CASES = 1000
cases_run: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    cleanup(Redis.from_url(REDIS_URL), PREFIX)


def assert_error_body(response) -> None:
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"type", "code", "message", "param"}


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_per_its_schema(case):
    beat(Redis.from_url(REDIS_URL), PREFIX)  # a fresh ready worker, so /readyz is 200 (its 503 is tested elsewhere)
    cases_run.append(case.operation.label)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    case.validate_response(response, checks=CHECKS)
    assert_error_body(response)
    if case.operation.definition.raw.get("security"):
        for headers in ({"Authorization": "Bearer bora_000000000000_wrong"}, {}):
            refused = case.call(headers=headers)
            assert refused.status_code == 401, refused.text
            case.validate_response(refused, checks=CHECKS)
            assert_error_body(refused)


def test_the_spec_documents_only_error_shapes_the_api_sends():
    """FastAPI documents a 422 as its own `HTTPValidationError` unless a route declares it; ours never sends it."""
    text = str(APP.openapi())
    assert "HTTPValidationError" not in text and "'ValidationError'" not in text


def test_enough_cases_ran():
    if len(cases_run) == 0:
        pytest.skip("the generated cases did not run in this session (selected alone?)")
    operations = len(set(cases_run))
    print(f"\nschemathesis: {len(cases_run)} generated cases over {operations} operations")  # noqa: T201
    assert len(cases_run) >= MIN_CASES, f"only {len(cases_run)} cases: raise max_examples"
