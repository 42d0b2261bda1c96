"""The order of a submission's checks: validate (422), replay an Idempotency-Key, then the rate limit, then the
queue caps. A retry of an accepted request gets its job back even when the tenant is over its rate, and an
invalid request spends no rate-limit token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.service.conftest import TENANT, bearer


@pytest.fixture
def slow_client(settings, api_key) -> Iterator[TestClient]:
    """Two submissions at once, then one every 1000 s: the bucket does not refill during a test."""
    app = create_app(settings.model_copy(update={"rate_limit_burst": 2, "rate_limit_per_second": 0.001}))
    with TestClient(app, raise_server_exceptions=False, headers=bearer(api_key)) as client:
        yield client


def test_a_retry_is_replayed_even_when_over_the_rate(slow_client, redis_conn, settings):
    first = slow_client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 202
    assert slow_client.post("/v1/videos", json={"prompt": "a lung"}).status_code == 202  # the bucket is empty now
    assert slow_client.post("/v1/videos", json={"prompt": "a liver"}).status_code == 429

    again = slow_client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "order-1"})
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"

    # A new key over the rate: 429, and the key is not kept, so the same request succeeds once allowed.
    refused = slow_client.post("/v1/videos", json={"prompt": "a kidney"}, headers={"Idempotency-Key": "order-2"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert redis_conn.get(f"{settings.key_prefix}:idem:{TENANT}:order-2") is None
    assert len(slow_client.get("/v1/videos").json()["data"]) == 2


@pytest.mark.parametrize("invalid", [
    {"prompt": "   "},                                           # blank
    {"prompt": "p", "num_frames": 64},                            # over the served model's 32 frames
    {"prompt": "p", "num_inference_steps": 500},                  # over its steps
    {"prompt": "p", "height": 65},                                # not a multiple of 16 (the schema says so)
    {"prompt": "p", "model": "other"},                            # not served here
    {"prompt": "p", "webhook": {"url": "https://evil.example"}},  # webhooks off (empty allowlist)
])
def test_invalid_requests_spend_no_token(slow_client, invalid):
    for _ in range(5):
        assert slow_client.post("/v1/videos", json=invalid).status_code == 422
    assert slow_client.post("/v1/videos", json={"prompt": "a heart"}).status_code == 202
    assert slow_client.post("/v1/videos", json={"prompt": "a lung"}).status_code == 202
    assert slow_client.post("/v1/videos", json={"prompt": "a liver"}).status_code == 429
