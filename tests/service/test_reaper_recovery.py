"""What the reaper does with a dead worker's job besides the transition (tests/worker/test_reaper.py has the
transitions themselves): the webhook, the audit line, and a re-queue that writes the job's status and its RQ
entry in one transaction, with the options the API enqueues with."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from service.api.app import create_app
from service.jobs import jobstore, queueing, reaper, webhooks
from service.jobs.errors import InvalidTransition, JobNotFound
from service.jobs.logs import JsonFormatter
from service.jobs.schemas import JobRecord, JobStatus, Webhook
from tests.service.conftest import bearer, queued_record

HOOK = Webhook(url="https://hooks.example.org/bora", events=["video.failed", "video.canceled"])


def submit(r, settings, *, webhook: Webhook | None = HOOK) -> JobRecord:
    """A queued job as the API stores it: the job hash and its RQ entry in one script."""
    record = queued_record(prompt="a lost heart").model_copy(update={"webhook": webhook, "request_id": "req-1"})
    entry = queueing.rq_entry(Queue(settings.queue_name, connection=r), settings, queueing.payload_of(record))
    jobstore.create(r, record, prefix=settings.key_prefix, rq_entry=entry)
    return record


def take(r, settings, job_id: str, worker_id: str = "ghost") -> str:
    """What a worker does when it takes a job (and then dies: it never beats); the run's token."""
    Queue(settings.queue_name, connection=r).remove(job_id)
    token = jobstore.mark_running(r, job_id, worker_id, prefix=settings.key_prefix).token
    registry = StartedJobRegistry(settings.queue_name, connection=r)
    r.zadd(registry.key, {f"{job_id}:exec-{worker_id}": time.time() + 600})
    return token


def webhook_events(r, settings) -> list[tuple[str, str]]:
    queue = Queue(webhooks.queue_name(settings.key_prefix), connection=r)
    try:
        return [(job.kwargs["job_id"], job.kwargs["event"]) for job in queue.jobs]
    finally:
        queue.empty()


def audit_lines(caplog, job_id: str) -> list[dict]:
    return [json.loads(JsonFormatter().format(rec)) for rec in caplog.records
            if rec.name == "bora.audit" and getattr(rec, "job_id", None) == job_id]


def test_jobs_ended_by_the_reaper_send_their_webhooks(redis_conn, settings):
    lost, canceling, quiet = (submit(redis_conn, settings) for _ in range(3))
    quiet_one = submit(redis_conn, settings, webhook=None)
    for record in (lost, canceling, quiet, quiet_one):
        take(redis_conn, settings, record.id)
    jobstore.request_cancel(redis_conn, canceling.id, prefix=settings.key_prefix)
    outcomes = reaper.reap(redis_conn, settings, max_attempts=1)
    assert outcomes == {lost.id: "failed", canceling.id: "canceled", quiet.id: "failed", quiet_one.id: "failed"}
    assert sorted(webhook_events(redis_conn, settings)) == sorted(
        [(lost.id, "video.failed"), (canceling.id, "video.canceled"), (quiet.id, "video.failed")]
    )


def test_jobs_ended_by_the_reaper_are_audited(redis_conn, settings, caplog):
    caplog.set_level(logging.INFO, logger="bora.audit")
    requeued, failed = submit(redis_conn, settings), submit(redis_conn, settings)
    take(redis_conn, settings, requeued.id)
    lost = take(redis_conn, settings, failed.id)
    jobstore.mark_requeued(redis_conn, failed.id, prefix=settings.key_prefix, token=lost, actor="test")  # lost before
    take(redis_conn, settings, failed.id, "ghost-2")
    assert reaper.reap(redis_conn, settings) == {requeued.id: "requeued", failed.id: "failed"}

    digest = hashlib.sha256(b"a lost heart").hexdigest()
    for record, event, attempt, worker in [(requeued, "job.requeued", 1, "ghost"), (failed, "job.failed", 2, "ghost-2")]:
        [line] = audit_lines(caplog, record.id)
        assert line["event"] == event and line["outcome"] == event.removeprefix("job.") and line["level"] == "warning"
        assert line["prompt_sha256"] == digest and line["params"]["num_frames"] == 16 and "prompt" not in line["params"]
        assert line["tenant"] == record.tenant and line["request_id"] == "req-1"
        assert line["lost_worker"] == worker and line["attempt"] == attempt and line["reason"] == "worker_lost"
        assert "a lost heart" not in json.dumps(line)


def test_requeue_enqueues_like_the_api(redis_conn, settings, api_key):
    with TestClient(create_app(settings), headers=bearer(api_key)) as client:
        created = client.post("/v1/videos", json={"prompt": "a heart"}).json()["id"]
        other = client.post("/v1/videos", json={"prompt": "a lung"}).json()["id"]
    token = take(redis_conn, settings, created)
    before = Job.fetch(other, connection=redis_conn)
    record = queueing.requeue(redis_conn, created, settings, token=token, actor="test")
    assert record.status == JobStatus.queued and record.queue_position == 1  # at the front
    again = Job.fetch(created, connection=redis_conn)
    for option in ("func_name", "timeout", "result_ttl", "failure_ttl", "origin"):
        assert getattr(again, option) == getattr(before, option), option
    assert again.func_name == queueing.WORKER_FUNCTION and again.result_ttl == queueing.RQ_RESULT_TTL_SECONDS
    assert again.args[0]["job_id"] == created and again.args[0]["input"]["prompt"] == "a heart"
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [created, other]


def test_requeue_is_one_transaction(redis_conn, settings, monkeypatch):
    record = submit(redis_conn, settings)
    token = take(redis_conn, settings, record.id)

    def crash(*args, **kwargs):
        raise RuntimeError("the process died between the two writes")

    monkeypatch.setattr(queueing, "enqueue", crash)
    with pytest.raises(RuntimeError):
        queueing.requeue(redis_conn, record.id, settings, token=token, actor="test")
    # Nothing was written: the job is still running (so a reaper will find it again), and not in RQ's queue.
    assert jobstore.get(redis_conn, record.id, prefix=settings.key_prefix).status == JobStatus.running
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == []
    monkeypatch.undo()
    assert reaper.reap(redis_conn, settings) == {record.id: "requeued"}
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [record.id]


def test_a_cancel_that_races_the_requeue_wins(redis_conn, settings, monkeypatch):
    """The job hash is WATCHed: a cancel between the read and the write makes the transaction start over, and
    a `canceling` job is not re-queued."""
    record = submit(redis_conn, settings)
    token = take(redis_conn, settings, record.id)
    payload_of = queueing.payload_of

    def cancel_meanwhile(stored):
        if jobstore.get(redis_conn, record.id, prefix=settings.key_prefix).status == JobStatus.running:
            jobstore.request_cancel(redis_conn, record.id, prefix=settings.key_prefix)
        return payload_of(stored)

    monkeypatch.setattr(queueing, "payload_of", cancel_meanwhile)
    with pytest.raises(InvalidTransition):
        queueing.requeue(redis_conn, record.id, settings, token=token, actor="test")
    assert jobstore.get(redis_conn, record.id, prefix=settings.key_prefix).status == JobStatus.canceling
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == []


def test_requeue_refuses_jobs_that_are_not_running(redis_conn, settings):
    record = submit(redis_conn, settings)
    with pytest.raises(InvalidTransition):
        queueing.requeue(redis_conn, record.id, settings, token=None, actor="test")  # queued already
    with pytest.raises(JobNotFound):
        queueing.requeue(redis_conn, "vid_missing", settings, token=None, actor="test")
    token = take(redis_conn, settings, record.id)
    jobstore.request_cancel(redis_conn, record.id, prefix=settings.key_prefix)
    with pytest.raises(InvalidTransition):
        queueing.requeue(redis_conn, record.id, settings, token=token, actor="test")  # canceling: it ends canceled, never runs again
