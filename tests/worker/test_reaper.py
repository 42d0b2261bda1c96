"""Jobs of dead workers (heartbeat expired) are re-queued once, then fail `worker_lost`; none stays running."""

from __future__ import annotations

import time

from rq.registry import StartedJobRegistry

from service import heartbeats, jobstore
from service.schemas import JobStatus, WorkerHeartbeat, WorkerState
from worker import reaper


def _start_on(env, job_id: str, worker_id: str) -> None:
    """What a worker does when it takes a job: our transition plus RQ's started-registry entry."""
    jobstore.mark_running(env.r, job_id, worker_id, prefix=env.prefix)
    registry = StartedJobRegistry(env.settings.queue_name, connection=env.r)
    env.r.zadd(registry.key, {f"{job_id}:exec-{worker_id}": time.time() + 600})


def test_dead_worker_job_requeued_once_then_fails(env, runtime):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "ghost-1")
    assert reaper.reap(env.r, env.settings) == {payload.job_id: "requeued"}
    record = env.record(payload.job_id)
    assert record.status == JobStatus.queued and record.queue_position == 1 and record.attempts == 1
    assert reaper.reap(env.r, env.settings) == {}  # nothing left to do

    env.r.delete(f"rq:queue:{env.settings.queue_name}")  # as if another worker took it...
    _start_on(env, payload.job_id, "ghost-2")  # ...and died too
    assert reaper.reap(env.r, env.settings) == {payload.job_id: "failed"}
    record = env.record(payload.job_id)
    assert record.status == JobStatus.failed and record.error.code == "worker_lost" and record.error.retryable


def test_requeued_job_runs_to_success(env, runtime):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "ghost")
    reaper.reap(env.r, env.settings)
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 2


def test_live_worker_and_canceling_jobs(env):
    alive, canceling = env.submit(enqueue=False), env.submit(enqueue=False)
    heartbeats.publish(
        env.r, WorkerHeartbeat(worker_id="alive", state=WorkerState.busy), prefix=env.prefix, ttl_seconds=30
    )
    _start_on(env, alive.job_id, "alive")
    _start_on(env, canceling.job_id, "ghost")
    jobstore.request_cancel(env.r, canceling.job_id, prefix=env.prefix)
    assert reaper.reap(env.r, env.settings) == {canceling.job_id: "canceled"}
    assert env.record(alive.job_id).status == JobStatus.running
    assert env.record(canceling.job_id).status == JobStatus.canceled
