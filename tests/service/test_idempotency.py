"""Idempotency keys against the real Redis on 127.0.0.1:6379 (DB 14, a prefix of our own): the claim is written
with the job, so a key names one job that exists, whatever races or fails."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.jobs import idempotency, jobstore
from service.jobs.errors import Conflict
from service.jobs.idempotency import TTL_SECONDS, body_sha256
from service.jobs.schemas import JobRecord, JobStatus, Stage, VideoInput, utcnow
from tests.support import scratch_redis


@pytest.fixture
def r():
    yield from scratch_redis("test-idem")


def _record(tenant: str = "t1") -> JobRecord:
    now = utcnow()
    inp = VideoInput(prompt="a beating heart", num_frames=8, height=32, width=32, fps=8, num_inference_steps=2,
                     guidance_scale=7.0, sampler="ddim", seed=1)
    return JobRecord(id=jobstore.new_job_id(), status=JobStatus.queued, stage=Stage.queued, created_at=now,
                     updated_at=now, model="tiny", input=inp, seed=1, tenant=tenant)


def _create(client, prefix, record, key, body):
    claim = idempotency.claim(prefix, record.tenant, key, body)
    return jobstore.create(client, record, prefix=prefix, claim=claim)


def test_first_create_wins_a_replay_returns_it_and_another_body_conflicts(r):
    client, prefix = r
    body = body_sha256({"prompt": "a beating heart", "seed": 1})
    first = _record()
    assert _create(client, prefix, first, "k1", body) == (first, False)
    stored, replayed = _create(client, prefix, _record(), "k1", body)
    assert replayed and stored.id == first.id
    with pytest.raises(Conflict) as refused:
        _create(client, prefix, _record(), "k1", body_sha256({"prompt": "a lung", "seed": 1}))
    assert refused.value.code == "idempotency_key_reused"
    other_tenant = _record("t2")  # another tenant's identical key is a different key
    assert _create(client, prefix, other_tenant, "k1", body) == (other_tenant, False)
    assert 0 < client.ttl(f"{prefix}:idem:t1:k1") <= TTL_SECONDS
    assert idempotency.lookup(client, prefix, "t1", "k1") == (first.id, body)
    assert client.zcard(f"{prefix}:jobs") == 2


def test_body_fingerprint_ignores_order_and_whitespace():
    assert body_sha256({"a": 1, "b": [1, 2]}) == body_sha256({"b": [1, 2], "a": 1})
    assert body_sha256({"a": 1}) != body_sha256({"a": 2})


def test_concurrent_creates_with_one_key_make_one_job(r):
    client, prefix = r
    body = body_sha256({"prompt": "x"})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _create(client, prefix, _record(), "race", body), range(32)))
    winners = [record.id for record, replayed in results if not replayed]
    assert len(winners) == 1
    assert {record.id for record, _ in results} == set(winners)
    assert client.zcard(f"{prefix}:jobs") == 1


def test_a_key_whose_job_expired_is_free_again(r):
    client, prefix = r
    first = _record()
    _create(client, prefix, first, "short", "h")
    client.delete(jobstore.Keys(prefix).job(first.id))  # what retention expiry does
    second = _record()
    assert _create(client, prefix, second, "short", "h") == (second, False)
