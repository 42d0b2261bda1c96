"""Cancellation on real parts: the in-process RQ worker with the tiny pipeline, a real Redis, and a client
cancelling from another thread (as the API does) while the job runs."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from redis import Redis

from service.jobs import jobstore
from service.jobs.schemas import JobStatus


def _audit_lines(caplog, job_id: str) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if r.name == "worker.lifecycle" and getattr(r, "job_id", None) == job_id]


def test_queued_job_canceled_never_starts_and_the_worker_takes_the_next(env, runtime, caplog):
    caplog.set_level(logging.INFO)
    doomed, follower = env.submit(), env.submit(seed=8)
    after, _ = jobstore.request_cancel(env.r, doomed.job_id, prefix=env.prefix)
    assert after.status == JobStatus.canceled  # at once: no worker involved
    # Its RQ entry went in the same transaction: no worker ever sees it.
    assert env.r.lpos(jobstore.Keys(env.prefix).rq_queue, doomed.job_id) is None
    env.work()
    record = env.record(doomed.job_id)
    assert record.status == JobStatus.canceled and record.error and record.error.code == "canceled"
    assert record.started_at is None and record.worker_id is None and record.attempts == 0
    assert record.step is None and record.outputs is None
    assert _audit_lines(caplog, doomed.job_id) == []
    assert env.record(follower.job_id).status == JobStatus.succeeded


def test_a_worker_skips_a_canceled_job_it_dequeued_anyway(env, runtime, caplog):
    """A worker may have taken the RQ entry just before the cancel: it must not start the job."""
    caplog.set_level(logging.INFO)
    doomed = env.submit(enqueue=False)
    jobstore.request_cancel(env.r, doomed.job_id, prefix=env.prefix)
    env.enqueue(doomed.model_dump(mode="json"), doomed.job_id)
    env.work()
    assert env.record(doomed.job_id).attempts == 0
    events = [line["event"] for line in _audit_lines(caplog, doomed.job_id)]
    assert events == ["job.skipped"]


def test_running_job_canceled_mid_denoising_stops_within_one_step(env, runtime, caplog):
    caplog.set_level(logging.INFO)
    long = env.submit(num_frames=16, height=64, width=64, num_inference_steps=100, prompt="a slow heart")
    follower = env.submit(seed=9)
    seen: dict[str, Any] = {}

    def client() -> None:  # polls like a client, then cancels once denoising is well under way
        r = Redis.from_url(env.settings.redis_url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = jobstore.get(r, long.job_id, prefix=env.prefix)
            if job is not None and job.status == JobStatus.running and (job.step or 0) >= 20:
                after, _ = jobstore.request_cancel(r, long.job_id, prefix=env.prefix)
                seen.update(status=after.status, step=after.step, total=after.total_steps)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=client)
    thread.start()
    env.work()
    thread.join()

    assert seen["status"] == JobStatus.canceling and seen["total"] == 100
    assert 20 <= seen["step"] < 100, seen  # the cancel landed mid-denoising
    record = env.record(long.job_id)
    assert record.status == JobStatus.canceled and record.error and record.error.code == "canceled"
    assert record.started_at is not None and record.outputs is None
    # `step` read right after the cancel was written: the step whose progress write sees `canceling` is at
    # most the next one, and the sampler checks should_cancel before starting another.
    assert record.step is not None and record.step <= seen["step"] + 1, (seen, record.step)
    assert not list(env.settings.storage_dir.rglob(f"*{long.job_id}*"))  # nothing uploaded
    assert env.record(follower.job_id).status == JobStatus.succeeded  # the worker moved on
    lines = _audit_lines(caplog, long.job_id)
    canceled = [line for line in lines if line["event"] == "job.canceled"]
    assert len(canceled) == 1 and canceled[0]["outcome"] == "canceled"


def test_worker_audit_lines_carry_request_id_and_prompt_hash(env, runtime, caplog):
    caplog.set_level(logging.INFO)
    payload = env.submit(prompt="an audited heart")
    env.work()
    lines = {line["event"]: line for line in _audit_lines(caplog, payload.job_id)}
    digest = hashlib.sha256(b"an audited heart").hexdigest()
    for event in ("job.running", "job.succeeded"):
        line = lines[event]
        assert line["request_id"] == payload.request_id and line["tenant"] == "t1"
        assert line["prompt_sha256"] == digest and line["params"]["seed"] == 7
        assert "an audited heart" not in json.dumps(line, default=str)  # the prompt itself is never logged
    assert lines["job.succeeded"]["outcome"] == "succeeded"
