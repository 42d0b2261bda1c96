"""Idempotency keys against the real Redis on 127.0.0.1:6379 (DB 14, a prefix of our own)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.jobs.idempotency import TTL_SECONDS, body_sha256, claim, release
from tests.support import scratch_redis


@pytest.fixture
def r():
    yield from scratch_redis("test-idem")


def test_first_claim_wins_replay_returns_it_and_other_body_conflicts(r):
    client, prefix = r
    body = body_sha256({"prompt": "a beating heart", "seed": 1})
    assert claim(client, prefix, "t1", "k1", body, "job-a") == (None, False)
    assert claim(client, prefix, "t1", "k1", body, "job-b") == ("job-a", False)
    other = body_sha256({"prompt": "a lung", "seed": 1})
    assert claim(client, prefix, "t1", "k1", other, "job-c") == ("job-a", True)
    # Another tenant's identical key is a different key.
    assert claim(client, prefix, "t2", "k1", body, "job-d") == (None, False)
    assert 0 < client.ttl(f"{prefix}:idem:t1:k1") <= TTL_SECONDS


def test_body_fingerprint_ignores_order_and_whitespace():
    assert body_sha256({"a": 1, "b": [1, 2]}) == body_sha256({"b": [1, 2], "a": 1})
    assert body_sha256({"a": 1}) != body_sha256({"a": 2})


def test_concurrent_claims_create_one_job(r):
    client, prefix = r
    body = body_sha256({"prompt": "x"})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: claim(client, prefix, "t", "race", body, f"job-{i}"), range(32)))
    winners = [i for i, (existing, _) in enumerate(results) if existing is None]
    assert len(winners) == 1
    assert {existing for existing, _ in results if existing} == {f"job-{winners[0]}"}
    assert not any(conflict for _, conflict in results)


def test_release_only_drops_own_claim(r):
    client, prefix = r
    body = body_sha256({})
    claim(client, prefix, "t", "k", body, "job-a")
    assert release(client, prefix, "t", "k", "job-other") is False
    assert claim(client, prefix, "t", "k", body, "job-b") == ("job-a", False)
    assert release(client, prefix, "t", "k", "job-a") is True
    assert claim(client, prefix, "t", "k", body, "job-b") == (None, False)


def test_expired_claim_can_be_reused(r):
    client, prefix = r
    claim(client, prefix, "t", "short", "h", "job-a", ttl=1)
    client.delete(f"{prefix}:idem:t:short")  # what expiry does, without waiting a second
    assert claim(client, prefix, "t", "short", "h2", "job-b") == (None, False)
