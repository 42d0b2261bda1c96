"""Token-bucket rate limit against the real Redis on 127.0.0.1:6379 (DB 14, a prefix of our own)."""

from __future__ import annotations

import time

import pytest

from service.api.ratelimit import Decision, RateLimiter
from tests.support import scratch_redis


@pytest.fixture
def r():
    yield from scratch_redis("test-rl")


def test_burst_then_refused_with_retry_after(r):
    client, prefix = r
    limiter = RateLimiter(client, prefix, rate=1.0, burst=3)
    decisions = [limiter.hit("t1") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    refused = decisions[-1]
    assert 0 < refused.retry_after <= 1.0
    assert refused.retry_after_header == "1"
    assert limiter.hit("t2").allowed  # tenants have separate buckets
    ttl = client.pttl(limiter.key("t1"))
    assert 0 < ttl <= 4000  # expires once it would be full again (+1 s slack)


def test_refills_at_rate(r):
    client, prefix = r
    limiter = RateLimiter(client, prefix, rate=20.0, burst=2)
    assert limiter.hit("t").allowed and limiter.hit("t").allowed
    refused = limiter.hit("t")
    assert not refused.allowed and refused.retry_after <= 0.05 + 1e-6
    time.sleep(refused.retry_after + 0.02)
    assert limiter.hit("t").allowed


def test_cost_larger_than_burst_is_never_allowed(r):
    client, prefix = r
    decision = RateLimiter(client, prefix, rate=10.0, burst=2).hit("t", cost=5)
    assert decision == Decision(False, pytest.approx(0.3), pytest.approx(2.0))


def test_rejects_nonsense_configuration(r):
    client, prefix = r
    for rate, burst in [(0, 1), (1, 0), (-1, 5)]:
        with pytest.raises(ValueError):
            RateLimiter(client, prefix, rate=rate, burst=burst)
