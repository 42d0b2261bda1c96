"""schemathesis against our own OpenAPI spec: no 5xx, and every answer matches its declared schema
(every error body included). A short run here; issue 5's ≥1000-case run can raise max_examples."""

from __future__ import annotations

import secrets
import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from service.config import Settings
from service.main import create_app
from tests.service.conftest import REDIS_URL, beat, cleanup

PREFIX = "bora-fuzz-" + secrets.token_hex(4)
APP = create_app(Settings(redis_url=REDIS_URL, key_prefix=PREFIX, data_dir=tempfile.mkdtemp(prefix="bora-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    cleanup(Redis.from_url(REDIS_URL), PREFIX)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_per_its_schema(case):
    beat(Redis.from_url(REDIS_URL), PREFIX)  # a fresh ready worker, so /readyz is 200 (its 503 is tested elsewhere)
    response = case.call()
    case.validate_response(
        response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
    )
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"type", "code", "message", "param"}
