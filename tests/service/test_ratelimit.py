"""The per-tenant token bucket inside the create script (service/jobs/admission.py), against the real Redis on
127.0.0.1:6379 (DB 14, a prefix of our own)."""

from __future__ import annotations

import time

import pytest

from service.jobs import jobstore
from service.jobs.admission import Limits
from service.jobs.errors import Refused
from service.jobs.schemas import JobRecord, JobStatus, Stage, VideoInput, utcnow
from tests.support import scratch_redis


@pytest.fixture
def r():
    yield from scratch_redis("test-rl")


def submit(client, prefix: str, limits: Limits, tenant: str = "t1") -> JobRecord:
    now = utcnow()
    inp = VideoInput(prompt="a heart", num_frames=8, height=32, width=32, fps=8, num_inference_steps=2,
                     guidance_scale=7.0, sampler="ddim", seed=1)
    record = JobRecord(id=jobstore.new_job_id(), status=JobStatus.queued, stage=Stage.queued, created_at=now,
                       updated_at=now, model="tiny", input=inp, seed=1, tenant=tenant)
    return jobstore.create(client, record, prefix=prefix, limits=limits)[0]


def rate(per_second: float, burst: int) -> Limits:
    return Limits(per_second, burst, max_queued_per_tenant=0, max_queued_total=0, queue_full_retry_after_seconds=1)


def test_burst_then_refused_with_retry_after(r):
    client, prefix = r
    limits = rate(1.0, 3)
    for _ in range(3):
        submit(client, prefix, limits)
    with pytest.raises(Refused) as refused:
        submit(client, prefix, limits)
    assert refused.value.code == "rate_limited" and refused.value.retry_after_seconds == 1
    assert "1 submissions/s (burst 3) for tenant t1" in refused.value.message
    submit(client, prefix, limits, tenant="t2")  # tenants have separate buckets
    ttl = client.pttl(jobstore.Keys(prefix).rate("t1"))
    assert 0 < ttl <= 4000  # expires once it would be full again (+1 s slack)
    assert jobstore.queued_count(client, "t1", prefix=prefix) == 3  # the refused one counts nowhere


def test_refills_at_rate(r):
    client, prefix = r
    limits = rate(20.0, 2)
    submit(client, prefix, limits)
    submit(client, prefix, limits)
    with pytest.raises(Refused):
        submit(client, prefix, limits)
    time.sleep(0.05 + 0.02)  # one token comes back every 1/20 s
    submit(client, prefix, limits)
    with pytest.raises(Refused):
        submit(client, prefix, limits)


def test_retry_after_rounds_up_to_whole_seconds(r):
    client, prefix = r
    limits = rate(0.25, 1)
    submit(client, prefix, limits)
    with pytest.raises(Refused) as refused:
        submit(client, prefix, limits)
    assert refused.value.retry_after_seconds in (3, 4)  # 4 s minus the moments since the first
